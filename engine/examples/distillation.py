"""Knowledge distillation on the digits: a wide teacher trains a tiny student.

    python -m engine.examples.distillation

The student (64-16-10) is trained twice on the same small budget (a 10% slice of the training
set, the same epochs and seed): once alone on the labels, once distilled from the teacher's
softened outputs. Both test accuracies are printed.
"""

from __future__ import annotations


import numpy as np

import engine
from engine.examples import DEVICE_HELP, argument_parser, chosen_device
from engine import nn, optim
from engine.examples.digits import prepare
from engine.train import Trainer
from engine.train.distill import DistillationTrainer


def teacher_model(device=None):
    return nn.Sequential(nn.Linear(64, 512, device=device), nn.ReLU(), nn.Linear(512, 256, device=device), nn.ReLU(),
                         nn.Linear(256, 10, device=device))


def student_model(device=None):
    return nn.Sequential(nn.Linear(64, 16, device=device), nn.ReLU(), nn.Linear(16, 10, device=device))


def main(argv=None) -> dict:
    parser = argument_parser("distillation", "distil a wide MLP into a tiny one")
    parser.add_argument("--teacher-epochs", type=int, default=20, help="epochs training the wide teacher")
    parser.add_argument("--student-epochs", type=int, default=150, help="epochs training each tiny student")
    parser.add_argument("--budget", type=float, default=0.1, help="fraction of the training set the student sees")
    parser.add_argument("--temperature", type=float, default=4.0, help="softmax temperature of the soft targets")
    parser.add_argument("--alpha", type=float, default=0.7, help="weight of the soft-target loss (1 - alpha: labels)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = parser.parse_args(argv)
    device = chosen_device(args.device)
    verbose = 0 if args.quiet else 1
    train, val, test = prepare()

    engine.manual_seed(0)
    teacher = teacher_model(device)
    Trainer(teacher, optim.Adam(teacher.parameters(), lr=1e-3), verbose=verbose).fit(
        train, epochs=args.teacher_epochs, val_data=val)
    teacher_accuracy = Trainer(teacher, None, verbose=0).evaluate(test)["accuracy"]

    n = int(len(train[0]) * args.budget)
    small = (train[0][:n], train[1][:n])

    def train_student(distil: bool) -> float:
        engine.manual_seed(1)
        student = student_model(device)
        opt = optim.Adam(student.parameters(), lr=3e-3)
        if distil:
            trainer = DistillationTrainer(student, teacher, opt, temperature=args.temperature, alpha=args.alpha,
                                          verbose=verbose)
        else:
            trainer = Trainer(student, opt, verbose=verbose)
        trainer.fit(small, epochs=args.student_epochs, batch_size=32)
        return Trainer(student, None, verbose=0).evaluate(test)["accuracy"]

    alone, distilled = train_student(False), train_student(True)
    print(f"teacher {teacher_accuracy:.4f}; student on {n} samples: alone {alone:.4f}, distilled {distilled:.4f}")
    return {"teacher": teacher_accuracy, "student_alone": alone, "student_distilled": distilled, "samples": n}


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
