"""Hyperparameter search on the digits: random search over learning rate, width and dropout,
scored by validation accuracy; the best configuration is then scored once on the test split.

    python -m engine.examples.search [--trials 8]
"""

from __future__ import annotations


import engine
from engine.examples import DEVICE_HELP, argument_parser, chosen_device
from engine import optim
from engine.examples.digits import build_model, prepare
from engine.train import Trainer
from engine.train.search import grid_search, random_search

SPACE = {"lr": ("log", 3e-4, 1e-2), "hidden": [64, 128, 256], "dropout": (0.0, 0.3)}


def main(argv=None) -> dict:
    parser = argument_parser("search", "random (or grid) search on the digits")
    parser.add_argument("--trials", type=int, default=8, help="configurations tried (random search)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per trial")
    parser.add_argument("--grid", action="store_true", help="grid search over a small fixed grid instead")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    args = parser.parse_args(argv)
    device = chosen_device(args.device)
    train, val, test = prepare()

    def fit(config) -> Trainer:
        engine.manual_seed(0)
        model = build_model(hidden=config["hidden"], dropout=config["dropout"], device=device)
        trainer = Trainer(model, optim.Adam(model.parameters(), lr=config["lr"]), verbose=0)
        trainer.fit(train, epochs=args.epochs, batch_size=64)
        return trainer

    def score(config) -> float:
        return fit(config).evaluate(val)["accuracy"]

    if args.grid:
        result = grid_search(score, {"lr": [1e-3, 3e-3], "hidden": [64, 256], "dropout": [0.0, 0.2]})
    else:
        result = random_search(score, SPACE, n_trials=args.trials, seed=0)
    print(result.table())
    test_accuracy = fit(result.best_config).evaluate(test)["accuracy"]
    print(f"best {result.best_config} (validation accuracy {result.best_score:.4f}); test accuracy {test_accuracy:.4f}")
    return {"best_config": result.best_config, "best_score": result.best_score, "test_accuracy": test_accuracy,
            "trials": len(result.trials)}


if __name__ == "__main__":
    main()
