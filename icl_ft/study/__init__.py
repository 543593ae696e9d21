"""The study: its typed config (``config``), its six stages (``stages``) and the pipeline that runs them into a
work directory that never loses a result (``pipeline``, with the bookkeeping in ``workdir``)."""

from icl_ft.study.config import STAGES, ConfigError, StudyConfig, saved_steps
from icl_ft.study.pipeline import MissingInputError, Step, Study, UnreadableRecordError

__all__ = ["STAGES", "ConfigError", "MissingInputError", "Step", "Study", "StudyConfig", "UnreadableRecordError",
           "saved_steps"]
