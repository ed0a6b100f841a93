"""Regression: an MLP fits a noisy nonlinear function of 8 inputs; reports MSE, MAE and R2.

    python -m engine.examples.regression

Targets are standardised on the training split; the loss is MSE; metrics are computed on the
original scale of the test split.
"""

from __future__ import annotations


import numpy as np

import engine
from engine.examples import DEVICE_HELP, argument_parser, chosen_device
import engine.functional as F
from engine import metrics, nn, optim
from engine.data import StandardScaler, train_val_test_split
from engine.train import Trainer


def make_data(n: int = 4000, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(n, 8)).astype(np.float32)
    y = np.sin(x[:, 0]) * 2 + x[:, 1] ** 2 - x[:, 2] * x[:, 3] + 0.5 * x[:, 4] + rng.normal(0, 0.1, n)
    return x, y.astype(np.float32)[:, None]


def main(argv=None) -> dict:
    parser = argument_parser("regression", "MLP regression on a synthetic nonlinear target")
    parser.add_argument("--epochs", type=int, default=40, help="passes over the training set")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = parser.parse_args(argv)
    engine.manual_seed(0)
    device = chosen_device(args.device)
    x, y = make_data()
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = train_val_test_split(x, y, val=0.1, test=0.2, seed=0)
    y_scaler = StandardScaler().fit(y_train)
    model = nn.Sequential(nn.Linear(8, 128, device=device), nn.ReLU(), nn.Linear(128, 64, device=device), nn.ReLU(),
                          nn.Linear(64, 1, device=device))
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=2e-3), loss_fn=F.mse_loss, metrics=["mae"],
                      verbose=0 if args.quiet else 1)
    trainer.fit((x_train, y_scaler.transform(y_train)), epochs=args.epochs,
                val_data=(x_val, y_scaler.transform(y_val)), batch_size=64)
    predicted = y_scaler.inverse_transform(trainer.predict(x_test).numpy())
    report = {"mse": metrics.mean_squared_error(predicted, y_test), "mae": metrics.mean_absolute_error(predicted, y_test),
              "r2": metrics.r2_score(predicted, y_test), "target_variance": float(y_test.var())}
    print(f"test MSE {report['mse']:.4f} (target variance {report['target_variance']:.3f})  "
          f"MAE {report['mae']:.4f}  R2 {report['r2']:.4f}")
    return report


if __name__ == "__main__":
    main()
