"""The errors a user sees for bad input, at the bottom of the import graph so every layer
can raise them: each names the field, file or argument at fault."""


class ConfigError(ValueError):
  """A config field is unknown, missing, of the wrong type or out of range."""


class InputFileError(ValueError):
  """A file given to a command cannot be read, or holds the wrong arrays (dtype, shape, range,
  missing keys): the message names the file and what is wrong with it, on one line."""
