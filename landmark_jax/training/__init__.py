"""What a train step computes: the jitted program (train_steps), the cosine
heads and their sharding, the losses, random streams and preemption."""
