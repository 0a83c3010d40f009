"""Packaging details pyproject.toml cannot state: the repository's `configs/` folder ships inside the
wheel as `umv2_jax/configs/` (so `load_config("paper/ultramem_v2_227m")` works from an installed
wheel), while users keep finding the configs at the top of a clone. Everything else is in
pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["umv2_jax*", "pallas_kernels*"]), "umv2_jax.configs"],
    package_dir={"umv2_jax.configs": "configs"},
    package_data={
        "umv2_jax": ["data/prepared/**/*"],
        "umv2_jax.configs": ["*.yaml", "**/*.yaml"],
    },
)
