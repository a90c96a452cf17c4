"""The data stage: the synthetic dataset (`synth`, its caption `grammar`), the Ray Data prepare pipeline
(`prepare`), curated subsets (`filter`), the empty prompt's embedding (`null_prompt`) and loaders (`load`)."""
