"""Numbers as the start-up summaries and `describe` print them."""


def count(n: float) -> str:
  for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if n >= scale:
      return f"{n / scale:.4g}{suffix}"
  return str(int(n))


def flops(n: float) -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if n >= scale:
      return f"{n / scale:.3g} {prefix}FLOP"
  return f"{int(n)} FLOP"


def binary(n: float) -> str:
  for scale, suffix in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
    if n >= scale:
      return f"{n / scale:.3g} {suffix}"
  return f"{int(n)} B"
