"""Applications on top of the library: the `difflab` command (`cli`) and the main job (`demo`).
Nothing in the library imports this package."""
