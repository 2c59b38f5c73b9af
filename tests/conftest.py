"""Suite-wide settings: nothing the tests do may write into the repository's working tree."""

import tempfile

from hypothesis import configuration, settings

# Hypothesis keeps failing examples and a constants cache under ./.hypothesis by default; the
# suite keeps no database and puts the cache in a temporary directory.
configuration.set_hypothesis_home_dir(tempfile.mkdtemp(prefix="epplan-hypothesis-"))
settings.register_profile("epplan", database=None)
settings.load_profile("epplan")
