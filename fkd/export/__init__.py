"""Deploying a trained model: ``fkd export`` to ``torch.export`` (.pt2) or ONNX, verified, optionally int8.

One module per concept:

* :mod:`fkd.export.saved_model` -- the student (or teacher) a run directory or checkpoint holds;
* :mod:`fkd.export.input_spec` -- what an exported file takes (normalisation built in);
* :mod:`fkd.export.module` -- ``Model.apply`` as an ``nn.Module`` returning logits, for the exporters;
* :mod:`fkd.export.pt2_format`, :mod:`fkd.export.onnx_format` -- writing and reading each format,
  :mod:`fkd.export.exported_file` -- the list of formats;
* :mod:`fkd.export.quantize` -- post-training static int8 (onnxruntime);
* :mod:`fkd.export.verify` -- logits against fkd's, accuracy over a split;
* :mod:`fkd.export.latency` -- CPU latency per image;
* :mod:`fkd.export.report` -- the metadata in the file and ``export.json`` beside it;
* :mod:`fkd.export.pipeline` -- ``export_model``, the command;
* :mod:`fkd.export.evaluate_exported` -- ``fkd evaluate FILE.pt2|FILE.onnx``.
"""
