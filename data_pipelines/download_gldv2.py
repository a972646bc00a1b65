r"""Downloads one Google Landmarks v2 split: verified, resumable and extracted.

    python -m data_pipelines.download_gldv2 --split=train --output_dir=DIR
    python -m data_pipelines.download_gldv2 --split=index --output_dir=DIR
    python -m data_pipelines.download_gldv2 --split=test --output_dir=DIR

then build the TFDS data sets from what it wrote (DIR is the manual dir):

    python -m data_pipelines.build_dataset --dataset=gldv2/clean \
        --manual_dir=DIR --data_dir=OUT
    python -m data_pipelines.build_dataset --dataset=gldv2/full \
        --manual_dir=DIR --data_dir=OUT

On a TPU VM, download to its local disk and write the builds straight to a
bucket with `--data_dir=gs://BUCKET/tfds` in the build_dataset commands.
--output_dir here must be a local path: tars are appended to and extracted.

Sizes: train is 500 tars of about 1 GB (~500 GB, and as much again once
extracted), index 100 tars of about 850 MB, test 20 tars of about 500 MB.
Delete DIR/tars/<split> after a successful run to get the tar space back (a
rerun then downloads everything again).

Layout (the GLDv2 v2.1 release, relative to --base_url): `<split>/images_NNN.tar`
with `a/b/c/<id>.jpg` members, `md5sum/<split>/md5.images_NNN.txt`, and the
CSVs under `metadata/` and `ground_truth/`. This program writes:

    DIR/<split>.csv ...                  the split's CSVs (kept if present)
    DIR/tars/<split>/images_NNN.tar      verified tars (.tar.part while partial)
    DIR/tars/<split>/images_NNN.done     written once a tar is fully extracted:
                                         its md5, size and mtime (JSON)
    DIR/<split>/a/b/c/<id>.jpg           the images
    DIR/missing-<split>.csv              CSV ids with no image (header `id`)

Rerunning is cheap and safe: a shard whose .done marker records the md5 of
its md5 file and the size and mtime its tar still has is skipped after one
stat, without reading the tar (train's 500 GB are not hashed again). A tar
that changed, or a missing, unreadable or older marker, is hashed again (and
re-extracted unless the marker names these bytes), with a log line saying
why; --verify hashes every tar, to find a change that kept size and mtime. A
partial download resumes with an HTTP Range request, and a tar whose md5
does not match is fetched again. --shards=0-4,7 downloads a subset.
"""

from __future__ import annotations

import csv
import os
import re
import time
from collections.abc import Sequence
from concurrent import futures

from absl import flags, logging

from data_pipelines import resumable_download, shard_markers
from data_pipelines.resumable_download import DownloadError
from data_pipelines.verified_tars import extract_tar, read_md5
from landmark_jax.runtime import entry_point_errors

# Number of image tars in each split of the v2.1 release.
SPLITS = {"train": 500, "index": 100, "test": 20}
DEFAULT_BASE_URL = "https://s3.amazonaws.com/google-landmark"
# The CSVs each split needs, relative to the base URL; all land in DIR/.
CSVS = {
    "train": ("metadata/train.csv", "metadata/train_clean.csv"),
    "index": ("metadata/index.csv", "metadata/index_image_to_landmark.csv"),
    "test": (
        "metadata/test.csv",
        "ground_truth/recognition_solution_v2.1.csv",
        "ground_truth/retrieval_solution_v2.1.csv",
    ),
}


def parse_shards(text: str | None, num_shards: int) -> list[int]:
    """Parses a shard selection like `0-4,7` into sorted shard numbers.

    Args:
      text: comma-separated numbers and inclusive ranges `a-b`; None or empty
        selects every shard.
      num_shards: the split's shard count; valid numbers are 0..num_shards-1.

    Returns:
      The selected shard numbers, sorted, without duplicates.

    Raises:
      ValueError: an item is not a number or range, a range is reversed, or a
        number is out of range; the message names the item and the valid range.
    """
    if not text or not text.strip():
        return list(range(num_shards))
    valid = f"valid shards are 0-{num_shards - 1}"
    selected: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise ValueError(f"--shards: {item!r} is not a number or a range a-b ({valid})")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"--shards: range {item!r} is reversed ({valid})")
        for value in (first, last):
            if value >= num_shards:
                raise ValueError(f"--shards: shard {value} (in {item!r}) is out of range; {valid}")
        selected.update(range(first, last + 1))
    return sorted(selected)


def _shard_job(
    split: str, shard: int, output_dir: str, base_url: str, retries: int, verify: bool = False
) -> str:
    """Downloads, verifies and extracts one shard.

    A shard whose tar and marker are here is skipped after a stat when the
    marker still matches the tar (see shard_markers.why_untrusted); otherwise, or with
    `verify`, the tar is hashed again, and fetched again if its md5 is wrong.

    Args:
      split: the split's name.
      shard: the shard's number.
      output_dir: the local folder of the download (module docstring).
      base_url: where the release lives, without a trailing slash.
      retries: attempts per file.
      verify: hash the tar even when its marker matches.

    Returns:
      "downloaded" if the tar was fetched this run, else "skipped".

    Raises:
      DownloadError: a file could not be fetched, or its md5 was wrong twice.
      ValueError: the md5 file holds no digest, or the tar has unsafe members.
    """
    name = f"images_{shard:03d}"
    tar_dir = os.path.join(output_dir, "tars", split)
    tar_path = os.path.join(tar_dir, f"{name}.tar")
    done = os.path.join(tar_dir, f"{name}.done")
    url = f"{base_url}/{split}/{name}.tar"
    md5_url = f"{base_url}/md5sum/{split}/md5.{name}.txt"
    md5_path = os.path.join(tar_dir, f"md5.{name}.txt")
    if not os.path.exists(md5_path):
        resumable_download.download(md5_url, md5_path, retries)
        os.replace(md5_path + ".part", md5_path)
    with open(md5_path) as f:
        text = f.read()
    try:
        expected = read_md5(text, md5_url)
    except ValueError:
        os.remove(md5_path)  # So that a rerun fetches it again.
        raise
    start = time.monotonic()

    status, fetched = "skipped", 0
    stat = None  # The tar's stat when it was hashed, once it matches.
    if os.path.exists(tar_path):
        if verify:
            logging.info("%s: --verify: hashing it again", tar_path)
        elif not os.path.exists(done):
            logging.info("%s: no marker (not fully extracted); hashing %s", done, tar_path)
        else:
            why = shard_markers.why_untrusted(done, tar_path, expected, md5_path)
            if why is None:
                logging.info("%s/%s.tar: verified and extracted before; skipped", split, name)
                return status
            logging.warning("%s; hashing the tar again", why)
        found, actual = shard_markers.stat_and_md5(tar_path)
        if actual == expected:
            stat = found
        else:
            logging.warning(
                "%s: md5 %s, expected %s; downloading again", tar_path, actual, expected
            )
            os.remove(tar_path)
    elif os.path.exists(done):
        logging.warning("%s: missing (%s is here); downloading it again", tar_path, done)
    if stat is not None and os.path.exists(done):
        # The tar is right, and was extracted before if its marker (written
        # only after extraction) names these bytes: an older version's marker
        # does. An unreadable one, or one for other bytes, says nothing of
        # what was extracted: extract again (it rewrites the same files).
        try:
            extracted = shard_markers.read_marker(done)["md5"] == expected
        except (OSError, ValueError):
            extracted = False
        if extracted:
            shard_markers.write_marker(done, f"{name}.tar", expected, stat)
            logging.info(
                "%s: md5 matches, extracted before; %s rewritten", tar_path, os.path.basename(done)
            )
            return status
    if os.path.exists(done):
        os.remove(done)  # Until the extraction below has finished.
    if stat is None:
        status = "downloaded"
        for refetch in (False, True):
            fetched += resumable_download.download(url, tar_path, retries)
            stat, actual = shard_markers.stat_and_md5(tar_path + ".part")
            if actual == expected:
                # A rename keeps the size and mtime the marker records.
                os.replace(tar_path + ".part", tar_path)
                break
            # A bad byte anywhere spoils the file, and resuming cannot find
            # it: fetch the whole file once more before giving up.
            os.remove(tar_path + ".part")
            if refetch:
                raise DownloadError(f"{url}: md5 mismatch twice: expected {expected}, got {actual}")
            logging.warning("%s: md5 %s, expected %s; fetching again", url, actual, expected)

    count = extract_tar(tar_path, os.path.join(output_dir, split))
    shard_markers.write_marker(done, f"{name}.tar", expected, stat)
    how = f"downloaded {fetched / 1e6:.1f} MB" if status == "downloaded" else "already here"
    seconds = time.monotonic() - start
    logging.info(
        "%s/%s.tar: %s, verified, %d files extracted in %.0f s", split, name, how, count, seconds
    )
    return status


def _fetch_csvs(split: str, output_dir: str, base_url: str, retries: int) -> dict[str, str]:
    """Downloads the split's CSVs into output_dir, keeping non-empty ones."""
    statuses = {}
    for relative in CSVS[split]:
        dest = os.path.join(output_dir, os.path.basename(relative))
        if os.path.exists(dest) and os.path.getsize(dest) > 0:
            logging.info("%s: already present, kept (delete it to download again)", dest)
            statuses[dest] = "kept"
            continue
        resumable_download.download(f"{base_url}/{relative}", dest, retries)
        os.replace(dest + ".part", dest)
        statuses[dest] = "downloaded"
    return statuses


def missing_images(split: str, output_dir: str) -> list[str]:
    """Returns the ids of DIR/<split>.csv that have no DIR/<split>/a/b/c/<id>.jpg."""
    images_dir = os.path.join(output_dir, split)
    path = os.path.join(output_dir, f"{split}.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "id" not in (reader.fieldnames or ()):
            raise ValueError(f"{path}: no `id` column (header: {reader.fieldnames})")
        ids = [row["id"] for row in reader]
    return [i for i in ids if not os.path.isfile(os.path.join(images_dir, *i[:3], f"{i}.jpg"))]


def download_split(
    split: str,
    output_dir: str,
    base_url: str = DEFAULT_BASE_URL,
    num_workers: int = 8,
    shards: str | Sequence[int] | None = None,
    retries: int = 3,
    verify: bool = False,
) -> dict:
    """Downloads, verifies and extracts one GLDv2 split (see the module docstring).

    A shard that fails does not stop the others; it is listed in the
    summary's "failed" entry.

    Args:
      split: "train", "index" or "test".
      output_dir: a local folder (created if needed).
      base_url: where the release lives.
      num_workers: shards downloaded at the same time.
      shards: a selection like "0-4,7", or shard numbers; None for all.
      retries: attempts per file before a transfer counts as failed.
      verify: hash every tar, even one whose marker still matches its size
        and mtime (a rerun otherwise only stats a finished shard's tar).

    Returns:
      A dict: split, shards (selected), downloaded and skipped (shard
      numbers), failed (shard number -> reason), csvs (path -> "downloaded"
      or "kept"), missing (ids without an image) and missing_csv (its path).

    Raises:
      ValueError: unknown split, bad shard selection, or a remote output_dir.
      DownloadError: a CSV could not be downloaded.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if "://" in output_dir:
        raise ValueError(f"--output_dir={output_dir}: must be a local folder")
    num_shards = SPLITS[split]
    if shards is None or isinstance(shards, str):
        selected = parse_shards(shards, num_shards)
    else:
        selected = parse_shards(",".join(str(int(s)) for s in shards), num_shards)
    base_url = base_url.rstrip("/")
    os.makedirs(os.path.join(output_dir, "tars", split), exist_ok=True)
    # The CSVs first: a wrong --base_url fails here in seconds, not per shard.
    csvs = _fetch_csvs(split, output_dir, base_url, retries)

    summary: dict = {"split": split, "shards": selected, "csvs": csvs}
    summary.update(downloaded=[], skipped=[], failed={})
    with futures.ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        jobs = {
            pool.submit(_shard_job, split, s, output_dir, base_url, retries, verify): s
            for s in selected
        }
        for done, job in enumerate(futures.as_completed(jobs), 1):
            shard = jobs[job]
            try:
                summary[job.result()].append(shard)
            except Exception as e:  # One bad shard must not stop the rest.
                summary["failed"][shard] = str(e) or type(e).__name__
                logging.error("%s/images_%03d.tar failed: %s", split, shard, e)
            logging.info("%s: %d of %d shards finished", split, done, len(selected))
    for key in ("downloaded", "skipped"):
        summary[key].sort()
    summary["failed"] = dict(sorted(summary["failed"].items()))

    missing = missing_images(split, output_dir)
    missing_csv = os.path.join(output_dir, f"missing-{split}.csv")
    with open(missing_csv, "w", newline="") as f:
        f.write("id\n")
        f.writelines(f"{i}\n" for i in missing)
    summary.update(missing=missing, missing_csv=missing_csv)
    return summary


def format_summary(summary: dict) -> str:
    """The report printed at the end of a run."""
    split = summary["split"]
    lines = [f"{path}: {status}" for path, status in summary["csvs"].items()]
    lines.append(
        f"{split}: {len(summary['shards'])} shards selected: "
        f"{len(summary['downloaded'])} downloaded, {len(summary['skipped'])} skipped "
        f"(already verified), {len(summary['failed'])} failed"
    )
    missing = summary["missing"]
    lines.append(f"{len(missing)} ids of {split}.csv have no image (in {summary['missing_csv']})")
    if missing:
        lines.append("  e.g. " + ", ".join(missing[:10]))
        if len(summary["shards"]) < SPLITS[split]:
            lines.append("  (only some shards were selected, so most of these are expected)")
    for shard, reason in summary["failed"].items():
        lines.append(f"FAILED {split}/images_{shard:03d}.tar: {reason}")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program: absl flags are
    global, and importing two tools into one process must not collide)."""
    flags.DEFINE_enum("split", None, list(SPLITS), "Which GLDv2 split to download.")
    flags.DEFINE_string("output_dir", None, "Local folder for the CSVs, tars and images.")
    flags.DEFINE_string("base_url", DEFAULT_BASE_URL, "Where the GLDv2 release lives.")
    flags.DEFINE_integer("num_workers", 8, "Shards downloaded at the same time.")
    flags.DEFINE_string("shards", None, "A subset of shards, e.g. 0-4,7 (default: all).")
    flags.DEFINE_integer("retries", 3, "Attempts per file before it counts as failed.")
    flags.DEFINE_bool(
        "verify",
        False,
        "Hash every tar again (a rerun otherwise trusts a finished shard whose tar "
        "still has the size and mtime its marker recorded).",
    )


def main(argv: Sequence[str]) -> int:
    entry_point_errors.refuse_arguments(argv)
    summary = download_split(
        FLAGS.split,
        FLAGS.output_dir,
        base_url=FLAGS.base_url,
        num_workers=FLAGS.num_workers,
        shards=FLAGS.shards,
        retries=FLAGS.retries,
        verify=FLAGS.verify,
    )
    print(format_summary(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["split", "output_dir"])
    entry_point_errors.run(main)
