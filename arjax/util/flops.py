"""The FLOP unit every module's accounting is written in."""


def matmul(rows: int, fan_in: int, fan_out: int) -> int:
  """FLOPs of [rows, fan_in] @ [fan_in, fan_out]: one multiply and one add per MAC."""
  return 2 * rows * fan_in * fan_out
