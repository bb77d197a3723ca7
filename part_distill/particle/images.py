"""Images as PARTICLE sees them: RGB, resized to one square side (the paper resizes to 224 x 224)."""
import cv2
import numpy as np

from ..data.image_io import read_image_or_skip

__all__ = ["read_square_image"]


def read_square_image(dataset_dict, size, counter):
    """uint8 [size, size, 3] RGB array of ``dataset_dict["file_name"]``, or None (counted in ``counter``)."""
    image = read_image_or_skip(dataset_dict["file_name"], counter, format="RGB")
    if image is None:
        return None
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    # Area averaging when shrinking avoids aliasing the textures the hypercolumns describe.
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(image, (size, size), interpolation=interp))
