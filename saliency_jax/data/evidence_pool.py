"""The Guided Zoom evidence pool on disk: a NumPy archive the ``npz`` source reads, streamed and written atomically.

Guided Zoom (Bargal 2019, Ch. 6, Algorithm 1) trains its Evidence CNN on a pool of (patch, label) pairs made once
from the training set; :mod:`saliency_jax.evaluation.guided_zoom` makes the patches batch by batch on the
accelerator and :class:`EvidencePoolWriter` streams them to one ``.npz`` archive:

==================  =========================================  ==============================================
key                 shape, dtype                               meaning
==================  =========================================  ==============================================
``x_train``         [n, out_h, out_w, channels] uint8          patches, ``round(255 * clip(patch, 0, 1))``
``y_train``         [n] int32                                  the source image's label
``round_train``     [n] int32                                  erasing round ``l`` (0 = most salient)
``method_train``    [n] int32                                  index into ``method_names``
``index_train``     [n] int64                                  index of the source image in its split
``x_test`` ...      the same for ``"test"`` (may hold 0 rows)  patches of test images (ground-truth class),
                                                               only to monitor the Evidence CNN
``class_names``     [num_classes] str                          label names
``method_names``    [num_methods] str                          grounding methods, e.g. ``["cEB"]``
``content_sha256``  [] str                                     the content digest of every other key
                                                               (:func:`pool_content_digest`)
==================  =========================================  ==============================================

Why this format: the archive is exactly what :func:`saliency_jax.data.sources.load_npz` (spec ``"npz"``) reads, so
the Evidence CNN trains through the generic loop and grain pipeline with no new code (``dataset.name = "npz"``,
``dataset.data_dir = <pool>.npz``); uint8 keeps a CIFAR-10 pool (up to 150k patches of 16 x 16 x 3) at 115 MB;
:func:`load_evidence_pool` selects methods or rounds (one file can hold Guided Zoom's and Ensemble Guided Zoom's
pools). The in-memory source suits pools up to a few GB; a paper-scale pool (tens of thousands of 224-pixel
patches, 5+ GB) would be better served by ArrayRecord (``grain.sources.ArrayRecordDataSource``), which the same
writer interface could target.

Streaming and atomicity: each :meth:`EvidencePoolWriter.add` appends raw bytes to per-key spool files in a hidden
temporary directory beside the destination (memory: one batch); :meth:`~EvidencePoolWriter.close` assembles the
archive under a temporary name in the same directory, flushes it to disk and ``os.replace``-s it onto the
destination, so a crash leaves either no file or the previous complete one, never half an archive.

Integrity: the writer seals the archive with ``content_sha256``, a SHA-256 of every other key's name, dtype, shape and
bytes (:func:`pool_content_digest`; computed from the data it streams, not re-read). :func:`verify_evidence_pool`
recomputes it from the file, so a pool whose content changed after it was written (labels or patches edited, a
damaged file) is refused naming the file: :func:`load_evidence_pool` does so before use, and the Guided Zoom evaluator
rebuilds such a pool instead of training an Evidence CNN on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from saliency_jax.data.core import SPLITS, ImageSource

__all__ = ["EvidencePoolError", "EvidencePoolWriter", "POOL_FIELDS", "load_evidence_pool", "pool_content_digest",
           "verify_evidence_pool", "write_evidence_split"]

#: Per-split fields of the archive (``<field>_<split>``) and their dtypes; ``x`` is the patch itself.
POOL_FIELDS: dict[str, np.dtype] = {
    "x": np.dtype(np.uint8),
    "y": np.dtype(np.int32),
    "round": np.dtype(np.int32),
    "method": np.dtype(np.int32),
    "index": np.dtype(np.int64),
}


#: The archive key holding the content digest.
DIGEST_KEY = "content_sha256"


class EvidencePoolError(ValueError):
    """An evidence pool whose content differs from the digest it was sealed with (or that has none).

    Attributes:
      path: the archive.
    """

    def __init__(self, message: str, path: pathlib.Path):
        super().__init__(message)
        self.path = path


def _member_header(key: str, dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    return json.dumps([key, np.dtype(dtype).str, [int(d) for d in shape]]).encode() + b"\n"


def _combine(members: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(members, sort_keys=True).encode()).hexdigest()


def pool_content_digest(arrays: dict[str, np.ndarray]) -> str:
    """The content digest of an evidence pool: a SHA-256 over each key's SHA-256 of its name, dtype, shape and bytes
    (C order), keys sorted; ``content_sha256`` itself is left out.

    Args:
      arrays: ``{key: array}``, e.g. every key of the archive (``dict(np.load(path))``).

    Returns:
      64 hex digits. Any changed label, patch, name, dtype or shape changes it.
    """
    members = {}
    for key, value in arrays.items():
        if key == DIGEST_KEY:
            continue
        value = np.ascontiguousarray(np.asarray(value))
        h = hashlib.sha256(_member_header(key, value.dtype, value.shape))
        h.update(value.tobytes())
        members[key] = h.hexdigest()
    return _combine(members)


def verify_evidence_pool(path: str | os.PathLike[str], expected: str | None = None) -> str:
    """Recomputes an evidence pool's content digest from the file and checks it against the one it was sealed with
    (its ``content_sha256`` key) and, if given, ``expected`` (e.g. the digest recorded when it was written).

    Args:
      path: the archive written by :class:`EvidencePoolWriter`.
      expected: the digest it must have, or None.

    Returns:
      The digest (64 hex digits).

    Raises:
      FileNotFoundError: no such file.
      EvidencePoolError: (a ``ValueError``) naming the file: unreadable, written without a digest (an older version,
        or not by :class:`EvidencePoolWriter`), or content that differs from its digest (labels, patches, names
        changed after it was written, or a damaged file).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evidence pool not found: {path}")
    return _verify(path, _read_archive(path), expected)


def _read_archive(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise EvidencePoolError(f"evidence pool {path} is unreadable ({type(e).__name__}: {e})", path) from e


def _verify(path: pathlib.Path, arrays: dict[str, np.ndarray], expected: str | None) -> str:
    if DIGEST_KEY not in arrays:
        raise EvidencePoolError(f"evidence pool {path} has no content digest ({DIGEST_KEY}): written by an older "
                                "version or not by EvidencePoolWriter; its content cannot be verified", path)
    sealed = str(arrays[DIGEST_KEY])
    actual = pool_content_digest(arrays)
    if actual != sealed:
        raise EvidencePoolError(f"evidence pool {path} differs from the content digest it was written with (its "
                                "labels, patches or names changed since, or the file is damaged)", path)
    if expected is not None and actual != expected:
        raise EvidencePoolError(f"evidence pool {path} is not the pool recorded beside it (content digest "
                                f"{actual[:16]}..., recorded {str(expected)[:16]}...)", path)
    return actual


def _names(values: Sequence[str] | None, name: str) -> tuple[str, ...]:
    if values is None or isinstance(values, (str, bytes)) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of strings; got {values!r}")
    values = tuple(str(v) for v in values)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct; got {values}")
    return values


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class EvidencePoolWriter:
    """Streams evidence patches into one ``.npz`` archive (layout in the module docstring), written atomically.

    Use as a context manager: on a clean exit the archive is written (``close``); if the block raises, everything
    is discarded (``abort``) and the destination is left untouched.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "pool.npz"
    >>> with EvidencePoolWriter(path, class_names=["a", "b"], method_names=["cEB"]) as w:
    ...     w.add("train", np.zeros((2, 4, 4, 3), np.float32), [0, 1], rounds=[0, 1], methods=[0, 0], indices=[7, 7])
    2
    >>> load_evidence_pool(path, "train").images.shape
    (2, 4, 4, 3)

    Args:
      path: destination ``.npz`` file (its directory is created).
      class_names: label names in label order (labels must lie in ``[0, len(class_names))``).
      method_names: names of the grounding methods (``methods`` index into it), e.g. ``["cEB", "Grad-CAM", "RISE"]``.

    Raises:
      ValueError: empty or repeated names.
    """

    def __init__(self, path: str | os.PathLike[str], *, class_names: Sequence[str],
                 method_names: Sequence[str]):
        self.path = pathlib.Path(path)
        self.class_names = _names(class_names, "class_names")
        self.method_names = _names(method_names, "method_names")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._spool = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".spool",
                                                    dir=self.path.parent))
        self._files = {(split, field): open(self._spool / f"{field}_{split}.raw", "wb")
                       for split in SPLITS for field in POOL_FIELDS}
        self._counts = {split: 0 for split in SPLITS}
        self._patch_shape: tuple[int, ...] | None = None
        self._open = True
        #: The content digest of the archive (:func:`pool_content_digest`), set by :meth:`close`.
        self.content_sha256: str | None = None

    # -- context manager ------------------------------------------------------------------------------------------

    def __enter__(self) -> EvidencePoolWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __len__(self) -> int:
        return sum(self._counts.values())

    def count(self, split: str) -> int:
        """Patches added to ``split`` so far."""
        self._check_split(split)
        return self._counts[split]

    # -- writing --------------------------------------------------------------------------------------------------

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")

    def _check_open(self) -> None:
        if not self._open:
            raise ValueError(f"EvidencePoolWriter for {self.path} is closed")

    def add(self, split: str, patches: Any, labels: Any, *, rounds: Any, methods: Any, indices: Any) -> int:
        """Appends patches (already selected: every row enters the pool).

        Args:
          split: ``"train"`` or ``"test"``.
          patches: [n, out_h, out_w, channels] float in [0, 1] (values outside are clipped: cubic resampling
            overshoots slightly) or uint8; stored as uint8.
          labels: int [n] in ``[0, len(class_names))``.
          rounds: int [n] erasing round ``l >= 0``.
          methods: int [n] in ``[0, len(method_names))``.
          indices: int [n] index of each patch's source image in its split.

        Returns:
          ``n``, the number of patches appended.

        Raises:
          ValueError: closed writer, bad split, shapes, ranges, NaN patches, or a patch shape different from earlier.
        """
        self._check_open()
        self._check_split(split)
        patches = np.asarray(patches)
        if patches.ndim != 4:
            raise ValueError(f"patches must be [n, height, width, channels]; got shape {patches.shape}")
        n = patches.shape[0]
        if self._patch_shape is not None and patches.shape[1:] != self._patch_shape:
            raise ValueError(f"patch shape {patches.shape[1:]} differs from the pool's {self._patch_shape}")
        columns = {}
        for field, values, upper in (("y", labels, len(self.class_names)), ("round", rounds, None),
                                     ("method", methods, len(self.method_names)), ("index", indices, None)):
            values = np.asarray(values)
            if values.shape != (n,):
                raise ValueError(f"{field} must have shape [{n}] (one per patch); got {values.shape}")
            if n and not np.issubdtype(values.dtype, np.integer):
                raise ValueError(f"{field} must be integers; got dtype {values.dtype}")
            if n and (values.min() < 0 or (upper is not None and values.max() >= upper)):
                bound = f"[0, {upper})" if upper is not None else ">= 0"
                raise ValueError(f"{field} must lie in {bound}; got range [{values.min()}, {values.max()}]")
            columns[field] = values.astype(POOL_FIELDS[field])
        if patches.dtype == np.uint8:
            columns["x"] = patches
        elif np.issubdtype(patches.dtype, np.floating):
            if n and not np.all(np.isfinite(patches)):
                raise ValueError("patches contain NaN or infinite values")
            columns["x"] = np.round(np.clip(patches, 0.0, 1.0) * 255.0).astype(np.uint8)
        else:
            raise ValueError(f"patches must be float in [0, 1] or uint8; got dtype {patches.dtype}")
        self._patch_shape = tuple(patches.shape[1:])
        for field, values in columns.items():
            self._files[(split, field)].write(np.ascontiguousarray(values).tobytes())
        self._counts[split] += n
        return n

    def add_pool(self, split: str, pool: Any, labels: Any, indices: Any) -> int:
        """Appends the valid patches of an :class:`~saliency_jax.evaluation.guided_zoom.EvidencePool`.

        Args:
          split: ``"train"`` or ``"test"``.
          pool: an ``EvidencePool`` (``patches`` [R, batch, ...], ``valid`` [R, batch], ``rounds`` [R],
            ``methods`` [R]) for a batch; moved to the host here.
          labels: int [batch] labels of the batch.
          indices: int [batch] indices of the batch's images in their split.

        Returns:
          The number of patches appended (``pool.valid.sum()``).

        Raises:
          ValueError: as :meth:`add`, or shapes inconsistent with the pool.
        """
        valid = np.asarray(pool.valid, bool)
        if valid.ndim != 2:
            raise ValueError(f"pool.valid must be [rounds, batch]; got shape {valid.shape}")
        num_rounds, batch = valid.shape
        labels, indices = np.asarray(labels), np.asarray(indices)
        if labels.shape != (batch,) or indices.shape != (batch,):
            raise ValueError(f"labels and indices must have shape [{batch}]; got {labels.shape}, {indices.shape}")
        rows, cols = np.nonzero(valid)  # round-major: all l = 0 patches of the batch, then l = 1, ...
        patches = np.asarray(pool.patches)[rows, cols]
        return self.add(split, patches, labels[cols], rounds=np.asarray(pool.rounds)[rows],
                        methods=np.asarray(pool.methods)[rows], indices=indices[cols])

    def abort(self) -> None:
        """Discards everything written so far; the destination is not touched."""
        for f in self._files.values():
            f.close()
        shutil.rmtree(self._spool, ignore_errors=True)
        self._open = False

    def close(self) -> pathlib.Path:
        """Writes the archive atomically (temporary name in the same directory, fsync, ``os.replace``), sealed with its
        content digest (``content_sha256``, also left in :attr:`content_sha256`).

        Returns:
          The destination path.

        Raises:
          ValueError: closed writer, or no patch was ever added (the patch shape is unknown).
        """
        self._check_open()
        if self._patch_shape is None:
            self.abort()
            raise ValueError(f"no patches were added to {self.path}; nothing written")
        for f in self._files.values():
            f.close()
        # A unique name created here (not mkstemp's, which is mode 0600): the archive gets the umask's permissions.
        tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex}.tmp"
        try:
            members = {}
            with open(tmp, "xb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED,
                                                       allowZip64=True) as archive:
                for split in SPLITS:
                    n = self._counts[split]
                    for field, dtype in POOL_FIELDS.items():
                        shape = (n, *self._patch_shape) if field == "x" else (n,)
                        key = f"{field}_{split}"
                        digest = hashlib.sha256(_member_header(key, dtype, shape))
                        with archive.open(f"{key}.npy", "w", force_zip64=True) as member, \
                                open(self._spool / f"{key}.raw", "rb") as raw:
                            np.lib.format.write_array_header_2_0(
                                member, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                         "shape": shape})
                            while chunk := raw.read(1 << 22):
                                digest.update(chunk)
                                member.write(chunk)
                        members[key] = digest.hexdigest()
                for key, names in (("class_names", self.class_names), ("method_names", self.method_names)):
                    value = np.asarray(names, dtype=str)
                    members[key] = hashlib.sha256(_member_header(key, value.dtype, value.shape)
                                                  + value.tobytes()).hexdigest()
                    with archive.open(f"{key}.npy", "w") as member:
                        np.lib.format.write_array(member, value, allow_pickle=False)
                content = _combine(members)
                with archive.open(f"{DIGEST_KEY}.npy", "w") as member:
                    np.lib.format.write_array(member, np.asarray(content), allow_pickle=False)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
            self.content_sha256 = content
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._open = False
        return self.path


def write_evidence_split(writer: EvidencePoolWriter, split: str, pool_fn: Any, images: np.ndarray,
                         labels: np.ndarray, *, batch_size: int, originals: np.ndarray | None = None,
                         progress: Any = None) -> int:
    """Runs a jitted pool function over a whole split in fixed-size batches and streams the result to ``writer``.

    The last batch is padded (repeating the first image) to keep one compiled shape; padded rows are dropped.

    Args:
      writer: the open :class:`EvidencePoolWriter`.
      split: ``"train"`` or ``"test"``.
      pool_fn: ``pool_fn(images, labels)`` or, with ``originals``, ``pool_fn(images, labels, originals)`` returning
        an ``EvidencePool`` (e.g. ``jax.jit(functools.partial(evidence_pool, grounding, logits_fn, ...))``).
      images: [n, h, w, c] float32 (what the conventional CNN sees).
      labels: int [n].
      batch_size: images per call.
      originals: optional [n, H, W, c] float32 to cut patches from.
      progress: optional callable ``progress(done, total)`` after each batch.

    Returns:
      The number of patches written for the split.

    Raises:
      ValueError: mismatched lengths or ``batch_size`` < 1.
    """
    n = len(images)
    if len(labels) != n or (originals is not None and len(originals) != n):
        raise ValueError(f"images ({n}), labels ({len(labels)}) and originals must have the same length")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    written = 0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        take = np.arange(start, start + batch_size)
        take = np.where(take < stop, take, start)  # pad with the batch's first image
        args = [images[take], labels[take]] + ([originals[take]] if originals is not None else [])
        pool = pool_fn(*args)
        keep = stop - start
        valid = np.asarray(pool.valid).copy()
        valid[:, keep:] = False
        written += writer.add_pool(split, pool._replace(valid=valid), labels[take], take)
        if progress is not None:
            progress(stop, n)
    return written


def load_evidence_pool(path: str | os.PathLike[str], split: str, *, methods: Sequence[str] | None = None,
                       rounds: Sequence[int] | None = None, image_size: int | None = None,
                       expected_digest: str | None = None) -> ImageSource:
    """An evidence pool (or part of it) as a grain random-access source for training the Evidence CNN, verified
    against its content digest first (:func:`verify_evidence_pool`).

    Without ``methods`` and ``rounds`` this is ``load_npz(path, split)`` with the pool's class names.

    Args:
      path: the archive written by :class:`EvidencePoolWriter`.
      split: ``"train"`` or ``"test"``.
      methods: keep only patches of these grounding methods (names as in ``method_names``); None keeps all.
      rounds: keep only these erasing rounds, e.g. ``[0]``; None keeps all.
      image_size: optional resize of every item (bilinear).
      expected_digest: the content digest the pool must have (e.g. recorded when it was written), or None.

    Returns:
      :class:`~saliency_jax.data.sources.ImageSource` named ``"<file stem>/<split>"``.

    Raises:
      FileNotFoundError: no such file.
      EvidencePoolError: (a ``ValueError``) the content differs from its digest, or it has none (names the file).
      ValueError: bad split, not a pool archive, or unknown method names.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evidence pool not found: {path}")
    wanted = [f"{field}_{split}" for field in POOL_FIELDS] + ["class_names", "method_names"]
    arrays = _read_archive(path)
    missing = [k for k in wanted if k not in arrays]
    if missing:
        raise ValueError(f"{path} is not an evidence pool: lacks {missing}")
    _verify(path, arrays, expected_digest)
    keep = np.ones(arrays[f"y_{split}"].shape, bool)
    method_names = [str(m) for m in arrays["method_names"]]
    if methods is not None:
        unknown = [m for m in methods if m not in method_names]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; the pool has {method_names}")
        keep &= np.isin(arrays[f"method_{split}"], [method_names.index(m) for m in methods])
    if rounds is not None:
        keep &= np.isin(arrays[f"round_{split}"], np.asarray(list(rounds), np.int32))
    return ImageSource(images=arrays[f"x_{split}"][keep], labels=arrays[f"y_{split}"][keep],
                       num_classes=len(arrays["class_names"]),
                       class_names=tuple(str(c) for c in arrays["class_names"]), name=f"{path.stem}/{split}",
                       image_size=image_size)
