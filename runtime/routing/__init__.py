"""Where a request is answered and why: rules, review of local answers, escalation."""
