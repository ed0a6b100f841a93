"""Training: the Trainer loop, Keras-style fit(), callbacks, and what goes beyond one run."""

from engine.train.callbacks import Callback, EarlyStopping, LRSchedulerCallback, ModelCheckpoint
from engine.train.loggers import CSVLogger, SummaryWriter, TensorBoardLogger
from engine.train.trainer import METRICS, History, Trainer, TrainingDiverged, fit

__all__ = ["Callback", "CSVLogger", "SummaryWriter", "TensorBoardLogger", "EarlyStopping", "LRSchedulerCallback",
           "ModelCheckpoint", "METRICS", "History", "Trainer", "TrainingDiverged", "fit"]
