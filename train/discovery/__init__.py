"""Task discovery: agent calls grouped by template, then by content, into proposed tasks."""
