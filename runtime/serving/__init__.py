"""Local requests without HTTP: jobs, prompts, response shaping, and the one trace recorder."""
