"""Logging in one place: console + `log.txt` + TensorBoard, on the main process only."""
import itertools
import logging
import os
import sys

_LOGGER_IDS = itertools.count()  # not id(self): a collected logger's id is reused, with its stale handlers


class RunLogger:
    def __init__(self, results_dir=None, is_main=True, tensorboard=True):
        self.is_main = is_main
        self.writer = None
        self.log = logging.getLogger(f"tinyfusion.run{next(_LOGGER_IDS)}")
        self.log.propagate = False
        self.log.setLevel(logging.INFO if is_main else logging.WARNING)
        if not is_main:
            self.log.addHandler(logging.NullHandler())
            return
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers = [logging.StreamHandler(sys.stdout)]
        if results_dir:
            os.makedirs(results_dir, exist_ok=True)
            handlers.append(logging.FileHandler(os.path.join(results_dir, "log.txt")))
        for h in handlers:
            h.setFormatter(fmt)
            self.log.addHandler(h)
        if results_dir and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(results_dir, "tb"))
            except ImportError:  # tensorboard is optional at run time
                self.writer = None

    def info(self, msg):
        self.log.info(msg)

    def scalars(self, step, values, prefix="train"):
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        for h in list(self.log.handlers):
            h.close()
            self.log.removeHandler(h)
