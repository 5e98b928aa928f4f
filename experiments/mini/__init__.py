"""The miniature paper: a verifiable task, a tiny M, programmatic revisers and judges."""
