"""Plain torch.nn building blocks. Keyword-only constructors of plain types; no pydantic, no fiddle.

Any file here can be lifted into another project with only torch as a dependency (and its
sibling imports).
"""
