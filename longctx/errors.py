"""User-facing errors.

Every problem a user can cause (bad recipe, bad override, missing file, shape
mismatch, corrupted checkpoint, non-finite loss) is raised as a `LongctxError`
whose message is one line naming the problem and the fix. The CLI prints it as
`error: <message>` and exits non-zero, with no traceback.
"""


class LongctxError(Exception):
  """An error caused by user input; its message is shown to the user verbatim."""


class ConfigError(LongctxError):
  """A recipe or override is invalid."""


class DataError(LongctxError):
  """A data source is missing, empty or malformed."""


class CheckpointError(LongctxError):
  """A checkpoint is missing, incompatible or corrupted."""


class TrainingError(LongctxError):
  """Training cannot continue (e.g. non-finite loss)."""


class DistributedError(LongctxError):
  """The processes of a multi-host run cannot start or do not agree (coordinator, ids, run dir)."""
