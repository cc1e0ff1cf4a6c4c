import numpy as np

from moe_llava.data import Scene, SceneObject
from moe_llava.train.tower import COLOR_CLASSES, SHAPE_CLASSES, coverage, probe_targets


def _scene():
    # 120 x 80 canvas -> padded to 120 x 120 (20 px bands top and bottom) -> 96 px: scale 0.8.
    star = SceneObject("star", "red", (0, 0), (20, 40), 30, (215, 35, 35))
    square = SceneObject("square", "blue", (1, 2), (100, 60), 20, (35, 75, 215))
    return Scene(120, 80, (230, 230, 230), (star, square))


def test_coverage_follows_padding_and_resize():
    cover = coverage(_scene(), image_size=96, patch_size=16)  # 6 x 6 patches
    assert cover.shape == (2, 36) and cover.max() <= 1
    # star bbox: x 5..35, y 25..55 (+20 pad) -> 4..28 x 36..60 px in the 96 px frame
    star = cover[0].reshape(6, 6)
    assert star[2:4, 0:2].min() > 0.4 and star[:2].sum() == 0 and star[:, 2:].sum() == 0
    np.testing.assert_allclose(cover[0].sum() * 16 * 16, 24 * 24, rtol=1e-6)  # total area preserved


def test_probe_targets():
    t = probe_targets(_scene(), 96, 16)
    assert t["object_shapes"].tolist() == [SHAPE_CLASSES.index("star") - 1, SHAPE_CLASSES.index("square") - 1,
                                           -100, -100]
    assert t["object_colors"][1] == COLOR_CLASSES.index("blue") - 1
    np.testing.assert_allclose(t["object_weights"][:2].sum(1), 1, rtol=1e-6)
    assert t["object_weights"][2:].sum() == 0
    labels = set(t["patch_shapes"].tolist())
    assert labels == {0, SHAPE_CLASSES.index("star"), SHAPE_CLASSES.index("square")}
    # image-level multi-label target: exactly the scene's two shape classes
    present = {SHAPE_CLASSES[i + 1] for i in np.flatnonzero(t["present"])}
    assert present == {"star", "square"}
