"""Sources of teacher signal. Each returns a `TeacherSignal` for a batch; the trainer picks one by
`teacher.source`."""
