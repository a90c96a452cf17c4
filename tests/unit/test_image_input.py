"""`image_encoder.load_image`, what `sora generate --image` and `TextToVideoPipeline(image=...)` read an image with:
a file's EXIF orientation is applied (as diffusers' `load_image` and the server's `open_image` do), so a phone's
portrait photo, stored landscape with a rotate tag, conditions the clip upright; bad inputs are one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sora_model.image_encoder import ImageInputError, load_image

ORIENTATION = 0x0112


def rotated_jpeg(path, orientation: int = 6):
    """A 40x24 JPEG (stored landscape) whose EXIF says 'rotate 90 CW to display' (6): upright it is 24x40. Its left
    half is red, its right half blue, so the rotation's direction shows too."""
    pixels = np.zeros((24, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    return path


def test_a_file_with_an_exif_rotation_is_read_upright(tmp_path):
    image = load_image(rotated_jpeg(tmp_path / "portrait.jpg"), "image")
    assert image.mode == "RGB" and image.size == (24, 40)  # (width, height): upright
    top, bottom = np.asarray(image)[2, 12], np.asarray(image)[-3, 12]
    assert top[0] > 200 and top[2] < 60, top  # rotated 90 clockwise: the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    # the same photo handed over as a PIL image is turned the same way; an upright one stays as it is
    with Image.open(tmp_path / "portrait.jpg") as opened:
        assert load_image(opened).size == (24, 40)
    assert load_image(load_image(tmp_path / "portrait.jpg")).size == (24, 40)  # applying it twice turns it once


def test_a_file_without_exif_and_an_array_keep_their_size(tmp_path):
    Image.new("RGB", (40, 24)).save(tmp_path / "plain.jpg")
    assert load_image(tmp_path / "plain.jpg").size == (40, 24)
    assert load_image(np.zeros((24, 40, 3), np.uint8)).size == (40, 24)


def test_bad_images_are_one_line_naming_them(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageInputError, match="image '.*bad.jpg' cannot be read as an image"):
        load_image(tmp_path / "bad.jpg", "image")
    with pytest.raises(ImageInputError, match="last_image '.*missing.png' is not a file"):
        load_image(tmp_path / "missing.png", "last_image")
