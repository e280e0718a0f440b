"""Your own nn.Module for fkd: copy this file, change the network, name it in a config.

Two ways to name it (docs/own_models.md, "Your own nn.Module"):

* ``student.arch = "my_model:TinyNet"`` -- ``module:Name``, with this file importable as ``my_model``
  (in the working directory, or on PYTHONPATH);
* ``student.arch = "tiny_net"`` with ``[distill] imports = ["docs/examples/my_model.py"]`` -- the
  ``@MODELS.register`` line below adds the name when fkd imports the file.

The contract:

* the constructor takes ``num_classes`` (the data set's class count, passed by fkd) and may take
  ``image_size`` (the side of the square input, ``data.image_size``); its other parameters, each with a
  default, are options: keys of ``[student]`` / ``[teacher]`` (``width = 32``), checked against the
  default's type, listed by ``fkd config --keys`` with the help of their ``Args:`` line below;
* ``forward(x)`` takes images ``(B, 3, H, W)`` and returns the logits ``(B, num_classes)``: nothing else;
* features are read by module path with FX, as for torchvision models: ``distill.student_features =
  ["stage1", "stage2"]`` names submodules (their outputs) or traced nodes (``stage2.1``), and
  ``"embedding"`` is the vector the last ``nn.Linear`` (the classifier head) reads. A wrong name is an
  error listing the valid ones. Keep ``forward`` traceable by torch.fx: no Python branches on tensor
  values;
* fkd holds the weights outside the module (torch.func ``functional_call``): never keep tensors of your
  own outside ``nn.Parameter`` / registered buffers, and no hooks.
"""

from torch import nn

from fkd.models import MODELS


class TinyNet(nn.Module):
    """Two conv stages, global average pooling, a linear head.

    Args:
        width: channels of the first stage (the second has twice as many)
        dropout: dropout before the head while training
    """

    def __init__(self, num_classes: int = 10, width: int = 16, dropout: float = 0.0):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        """``x`` (B, 3, H, W) -> logits (B, num_classes)."""
        x = self.stage2(self.stage1(x))
        return self.head(self.drop(self.pool(x).flatten(1)))


@MODELS.register("tiny_net")
def tiny_net(num_classes: int, image_size: int, *, width: int = 16, dropout: float = 0.0) -> nn.Module:
    """TinyNet under a plain name, for configs that import this file (distill.imports).

    Args:
        width: channels of the first stage (the second has twice as many)
        dropout: dropout before the head while training
    """
    return TinyNet(num_classes, width=width, dropout=dropout)
