"""Knowledge distillation: a teacher's softened outputs train a smaller student.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

This is Hinton et al.'s form: the KL divergence runs from the teacher's distribution to the
student's (``F.kl_div(log_softmax(student / T), softmax(teacher / T))``), and the T^2 factor keeps
the soft term's gradients on the same scale as the hard term's as T changes.
"""

from __future__ import annotations

import engine.functional as F
from engine.autograd import no_grad
from engine.tensor import Tensor
from engine.train.trainer import Trainer


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 4.0,
                      alpha: float = 0.7) -> Tensor:
    """The blended soft-target and hard-label loss above (a scalar, batch mean)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation_loss: alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"distillation_loss: temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation_loss: student logits {student_logits.shape} and teacher logits "
                         f"{teacher_logits.shape} must have the same shape")
    soft_targets = F.softmax(teacher_logits.detach() / temperature, axis=-1)
    soft = F.kl_div(F.log_softmax(student_logits / temperature, axis=-1), soft_targets, reduction="batchmean")
    hard = F.cross_entropy(student_logits, labels)
    return soft * (alpha * temperature ** 2) + hard * (1 - alpha)


class DistillationTrainer(Trainer):
    """A Trainer whose loss is :func:`distillation_loss` against a frozen teacher (run in eval mode).

    Example:
        >>> trainer = DistillationTrainer(student, teacher, optim.Adam(student.parameters()),
        ...                               temperature=4.0, alpha=0.7)           # doctest: +SKIP
        >>> trainer.fit((x, y), epochs=10)                                      # doctest: +SKIP
    """

    def __init__(self, student, teacher, optimizer, temperature: float = 4.0, alpha: float = 0.7, **kwargs):
        super().__init__(student, optimizer, loss_fn=F.cross_entropy, **kwargs)
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def compute_loss(self, x, output, y):
        self.teacher.eval()
        with no_grad():
            teacher_logits = self.teacher(x)
        return distillation_loss(output, teacher_logits, y, self.temperature, self.alpha)
