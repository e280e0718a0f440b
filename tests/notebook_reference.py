"""The seed notebook's loss functions, copied verbatim: the references fkd's losses must equal."""

import torch.nn.functional as F


def blended_distillation_loss(student_logits, teacher_logits, labels, T=2.0, alpha=0.7):
    soft_targets = F.softmax(teacher_logits / T, dim=1)
    student_log_probs = F.log_softmax(student_logits / T, dim=1)
    soft_loss = F.kl_div(student_log_probs, soft_targets, reduction='batchmean') * (T * T)
    hard_loss = F.cross_entropy(student_logits, labels)
    return alpha * soft_loss + (1.0 - alpha) * hard_loss


def feature_distillation_loss(student_out, teacher_out, student_feat, teacher_feat, labels,
                              alpha=0.7, beta=0.3):
    ce_loss = F.cross_entropy(student_out, labels)
    feat_loss = F.mse_loss(student_feat, teacher_feat.detach())
    return alpha * ce_loss + beta * feat_loss
