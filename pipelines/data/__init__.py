"""Ray Data stage: the synthetic dataset (`synth`), the prepare pipeline (`prepare`) and loaders (`load`)."""
