"""Hash-grid configs the tests share: small enough for many CPU steps."""

from t3d.fields.hashgrid import choose_hashgrid

CPU_GRID = choose_hashgrid("torch", "cpu")
# 4 levels of 2^12 from 8 cells: the renderer and guidance tests
SMALL_GRID = {
    "otype": "HashGrid",
    "n_levels": 4,
    "n_features_per_level": 2,
    "log2_hashmap_size": 12,
    "base_resolution": 8,
    "per_level_scale": 1.6,
}
# 4 levels of 2^10 from 4 cells: the trainer tests (VSD, recovery, the tiny pipeline)
TINY_GRID = {
    "otype": "HashGrid",
    "n_levels": 4,
    "n_features_per_level": 2,
    "log2_hashmap_size": 10,
    "base_resolution": 4,
    "per_level_scale": 1.5,
}
