"""Training: the loop (`loop`), students and what they train with (`students`), the teachers'
outputs they read (`teacher_outputs`), students held as one network (`networks`), the student
step (`step`) and groups of students trained together, stored and written (`groups`).

docs/architecture.md shows how a hyperparameter travels from params.yaml to the loss.
"""
