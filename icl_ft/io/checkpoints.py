"""Fine-tuning checkpoints with Orbax: the train state (parameters, optimizer state, step) plus a JSON
fingerprint of what produced it. Resuming refuses a checkpoint of another setup; evaluation restores the
parameters alone (about a third of the full state's memory with Adam)."""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator, Sequence

import jax

from icl_ft.io import files


class CheckpointMismatchError(ValueError):
  """A checkpoint directory belongs to another model or training setup."""


@contextlib.contextmanager
def quiet_orbax(level: str = "warning"):
  """Orbax logs every read and write through absl (and warns about read-only managers); keep the console for
  our own progress."""
  from absl import logging as absl_logging
  before = absl_logging.get_verbosity()
  absl_logging.set_verbosity(getattr(absl_logging, level.upper()))
  try:
    yield
  finally:
    absl_logging.set_verbosity(before)


def abstract(tree: Any) -> Any:
  """Shape, dtype and sharding of every leaf (what Orbax restores into)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def manager(directory: files.PathLike, keep: int | None = None, read_only: bool = False):
  """An Orbax ``CheckpointManager`` over ``directory`` (created unless ``read_only``)."""
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(files.absolute(directory), options=options)


def restore_latest(mngr, abstract_state: Any, fingerprint: dict) -> tuple[Any, int | None]:
  """(state, step) of the newest checkpoint, or (None, None) if there is none; ``CheckpointMismatchError``
  if it was written under another ``fingerprint``."""
  import orbax.checkpoint as ocp
  step = mngr.latest_step()
  if step is None:
    return None, None
  saved = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]["fingerprint"]
  expected = json.loads(json.dumps(fingerprint))
  if saved != expected:
    diff = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
    raise CheckpointMismatchError(
        f"{mngr.directory} holds checkpoints of another model or training setup (differing: {', '.join(diff)}); "
        "use a fresh work directory")
  return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"], step


def save(mngr, step: int, state: Any, fingerprint: dict) -> None:
  """Starts saving ``state`` as ``step`` (asynchronous: ``mngr.wait_until_finished()`` completes it)."""
  import orbax.checkpoint as ocp
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave({"fingerprint": fingerprint})))


def saved_params(directory: files.PathLike, abstract_params: Any,
                 steps: Sequence[int] | None = None) -> Iterator[tuple[int, Any]]:
  """(step, parameters) of the saved ``steps`` (default: every kept one), restoring the parameters alone
  (``state/params``: the optimizer state is never read)."""
  import orbax.checkpoint as ocp
  with quiet_orbax("error"):  # (Orbax warns that a read-only manager will not save)
    mngr = manager(directory, read_only=True)  # evaluation never touches the (digested) checkpoints
  with mngr:
    available = mngr.all_steps()
    missing = sorted(set(steps or ()) - set(available))
    if missing:
      raise FileNotFoundError(f"no checkpoint for steps {missing} in {directory} (saved: {sorted(available)})")
    item = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    for step in sorted(steps or available):
      args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
      yield step, mngr.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
