"""`python -m difflab.data fetch-mnist`: fetch MNIST once into the cache (what `make data` runs)."""
import sys

from difflab.data.mnist import main

sys.exit(main())
