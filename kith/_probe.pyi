from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

def find(hashes: Sequence[str], table: npt.NDArray[np.uint64], keys: npt.NDArray[np.uint64],
         refs: npt.NDArray[np.int64], text: npt.NDArray[np.uint8], k1: int, k2: int,
         shift: int) -> dict[str, str]: ...

def find_json(hashes: Sequence[str], table: npt.NDArray[np.uint64],
              keys: npt.NDArray[np.uint64], refs: npt.NDArray[np.int64],
              text: npt.NDArray[np.uint8], k1: int, k2: int,
              shift: int) -> tuple[bytes, int]: ...
