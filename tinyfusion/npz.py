"""ADM sample/reference batches: `.npz` files whose `arr_0` is uint8 (N, H, W, 3) RGB.

A 50K x 256 x 256 batch is 9.8 GB, so arrays are read and written as a stream of rows through the
zip member: `np.load` cannot memory-map an npz. Files written here are plain `np.savez` layout
(stored, not compressed), so `np.load(path)["arr_0"]` and ADM's TF evaluator read them.
"""
import contextlib
import os
import zipfile

import numpy as np

from core.errors import UserError
from tinyfusion.outputs import check_output_file

MAX_SAVE_IMAGES = 50_000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@contextlib.contextmanager
def _open_zip(path):
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; pass the path of an .npz batch")
    try:
        with zipfile.ZipFile(path) as zf:
            yield zf
    except zipfile.BadZipFile:
        raise UserError(f"{path} is not an .npz file (not a zip archive); write it with np.savez") from None


def npz_keys(path):
    """Array names in an npz (without reading any array)."""
    with _open_zip(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


@contextlib.contextmanager
def _open_array(path, key):
    """Yield (file positioned at the array data or None, shape, dtype) for one npz member.

    None means the member cannot be streamed (Fortran order, object dtype, unknown .npy version);
    the caller then falls back to loading it whole, as ADM does.
    """
    with _open_zip(path) as zf:
        name = f"{key}.npy"
        if name not in zf.namelist():
            raise UserError(f"{path} has no {key!r} array (it has {npz_keys(path)}); "
                            "sample batches must be written with np.savez(path, images)")
        with zf.open(name) as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                arr = np.load(path)[key]
                yield None, arr.shape, arr.dtype
                return
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            yield (None if fortran or dtype.hasobject else f), shape, dtype


def npz_array_info(path, key="arr_0"):
    """(shape, dtype) of one npz array, from its .npy header only."""
    with _open_array(path, key) as (_, shape, dtype):
        return shape, dtype


def iter_npz_batches(path, batch_size, key="arr_0"):
    """Yield consecutive row batches of `key` (writable arrays), holding one batch in memory."""
    with _open_array(path, key) as (f, shape, dtype):
        if f is None:
            arr = np.load(path)[key]
            for i in range(0, len(arr), batch_size):
                yield arr[i:i + batch_size]
            return
        for start in range(0, shape[0], batch_size):
            out = np.empty((min(batch_size, shape[0] - start), *shape[1:]), dtype)
            buf = memoryview(out).cast("B")
            got = 0
            while got < len(buf):  # zip members may return short reads
                n = f.readinto(buf[got:])
                if not n:
                    raise UserError(f"{path} is truncated: {key} ends before row {start + len(out)} of {shape[0]}")
                got += n
            yield out


def validate_sample_batch(path, expected_n=None, size=None, key="arr_0"):
    """Check an ADM batch is uint8 (N, H, W, 3) [with N == expected_n, H == W == size]; return its shape."""
    shape, dtype = npz_array_info(path, key)
    if len(shape) != 4 or shape[3] != 3:
        raise UserError(f"{path}: {key} has shape {shape}, expected (N, H, W, 3) RGB images in NHWC order")
    if dtype != np.uint8:
        raise UserError(f"{path}: {key} has dtype {dtype}, expected uint8 pixels 0..255")
    if expected_n is not None and shape[0] != expected_n:
        raise UserError(f"{path} holds {shape[0]} images, expected {expected_n}")
    if size is not None and tuple(shape[1:3]) != (size, size):
        raise UserError(f"{path} holds {shape[1]}x{shape[2]} images, expected {size}x{size}")
    return shape


class NpzWriter:
    """Stream `num` rows of shape `row_shape` into `path` as the npz array `key`, without holding them.

    Writes to `path + '.tmp'` and renames on a clean close, so `path` is either absent or complete.
    Use as a context manager; an exception or a short count leaves no file behind.
    """

    def __init__(self, path, num, row_shape, dtype=np.uint8, key="arr_0"):
        self.path, self.tmp = str(path), f"{path}.tmp"
        self.num, self.row_shape, self.dtype = num, tuple(row_shape), np.dtype(dtype)
        self.count = 0
        self._zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        # force_zip64: the member size is unknown to zipfile up front and may exceed 4 GB
        self._member = self._zip.open(f"{key}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (num, *self.row_shape)}
        np.lib.format.write_array_header_1_0(self._member, header)

    def write(self, rows):
        rows = np.asarray(rows)
        if rows.dtype != self.dtype or rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows {rows.dtype}{rows.shape} do not match {self.dtype}(N, {self.row_shape})")
        if self.count + len(rows) > self.num:
            raise ValueError(f"writing {self.count + len(rows)} rows into an npz sized for {self.num}")
        self._member.write(memoryview(np.ascontiguousarray(rows)).cast("B"))
        self.count += len(rows)

    def close(self):
        self._member.close()
        self._zip.close()
        if self.count != self.num:
            os.remove(self.tmp)
            raise ValueError(f"{self.path}: wrote {self.count} of {self.num} rows; file discarded")
        os.replace(self.tmp, self.path)

    def abort(self):
        self._member.close()
        self._zip.close()
        os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.abort() if exc_type else self.close()


def write_sample_batch(path, images):
    """Atomically write uint8 (N, H, W, 3) images as an ADM sample batch (`arr_0`)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype}{images.shape}")
    with NpzWriter(path, len(images), images.shape[1:]) as w:
        w.write(images)


def image_folder_to_npz(image_dir, out_path, num=None, progress=False, bad_images="stop", log=print):
    """Pack the first `num` images of `image_dir` (sorted names; default all, at most 50,000) into an
    ADM sample batch. Every image must be RGB and the same size. A file that is not a readable image
    stops the job (naming it) or, with bad_images='skip', is left out with a warning. Returns the number written."""
    from PIL import Image

    if not os.path.isdir(image_dir):
        raise UserError(f"--image_dir {image_dir} is not a directory")
    if num is not None and num < 1:
        raise UserError(f"--num {num} must be >= 1 (or leave it out to pack every image, at most {MAX_SAVE_IMAGES})")
    check_output_file(out_path, "--out")
    files = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
    num = min(len(files), MAX_SAVE_IMAGES) if num is None else num
    if not files or len(files) < num:
        raise UserError(f"{image_dir} has {len(files)} png/jpg images, need {max(num, 1)}; "
                        "sample more or lower --num")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num, desc="packing images")

    writer = None
    try:
        for name in files:
            if writer is not None and writer.count == num:
                break
            try:
                with Image.open(os.path.join(image_dir, name)) as im:
                    mode, arr = im.mode, np.asarray(im)
            except (OSError, ValueError) as e:  # not an image, or a truncated one
                if bad_images != "skip":
                    raise UserError(f"{os.path.join(image_dir, name)} is not a readable image ({type(e).__name__}): "
                                    f"remove it, or pass --bad-images skip") from None
                log(f"warning: skipping {os.path.join(image_dir, name)}: not a readable image ({type(e).__name__})")
                continue
            if mode != "RGB":
                raise UserError(f"{name} is mode {mode}, expected RGB; convert the images to RGB")
            if writer is None:
                first, writer = name, NpzWriter(out_path, num, arr.shape)
            elif arr.shape != writer.row_shape:
                raise UserError(f"{name} is {arr.shape[1]}x{arr.shape[0]} but {first} is "
                                f"{writer.row_shape[1]}x{writer.row_shape[0]}; all images must share one size")
            writer.write(arr[None])
            if bar is not None:
                bar.update(1)
        got = 0 if writer is None else writer.count
        if got < num:
            raise UserError(f"{image_dir} has only {got} readable images, need {num}; sample more or lower --num")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    writer.close()
    return num
