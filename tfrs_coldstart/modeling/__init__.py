"""Model building blocks: towers, the teacher and student models, their losses."""
