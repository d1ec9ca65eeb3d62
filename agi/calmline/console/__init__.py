"""`calmline console`: the supervisors' web console over the store the service writes."""
