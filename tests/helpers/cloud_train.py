"""`python -m landmark_jax.train` on a data set in TensorFlow's ram:// filesystem.

ram:// is the memory of one process, so this driver first copies a local TFDS
build into it (and lets TFDS open ram:// paths, tfds_ram.py), then runs the
train program's own main with the remaining flags:
python tests/helpers/cloud_train.py LOCAL_BUILD RAM_DATA_DIR [train flags].
"""

import sys

from absl import app

from landmark_jax import train
from landmark_jax.runtime import file_io


def copy_folder(source: str, target: str) -> None:
    """Copies the files of a flat folder (a TFDS build has no subfolders)."""
    for name in file_io.listdir(source):
        data = file_io.read_bytes(file_io.join(source, name))
        file_io.write_bytes(file_io.join(target, name), data)


if __name__ == "__main__":
    import tfds_ram

    tfds_ram.register()
    copy_folder(sys.argv[1], sys.argv[2])
    app.run(train.main, argv=[sys.argv[0], *sys.argv[3:]])
