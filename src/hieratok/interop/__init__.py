"""Interoperability with other libraries, each imported lazily by its own module
(:mod:`hieratok.interop.diffusers`: ``pip install hieratok[diffusers]``)."""
