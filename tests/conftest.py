"""Suite-wide settings: nothing the tests do may write into the repository's working tree."""

import tempfile

from hypothesis import configuration, settings

# Hypothesis keeps failing examples and a constants cache under ./.hypothesis by default; the
# suite keeps no database and puts the cache in a temporary directory.
configuration.set_hypothesis_home_dir(tempfile.mkdtemp(prefix="epplan-hypothesis-"))
# derandomize: the same examples on every run, so that CI passes or fails the same way each time.
settings.register_profile("epplan", database=None, derandomize=True)
settings.load_profile("epplan")
