"""The shipped recipes, importable as `pipeline.recipes` (pyproject.toml maps this folder there) so that
`pipeline recipes` finds them with importlib.resources in a wheel and in an editable install alike. Only the YAML and
JSON files here are recipes; this file holds no code."""
