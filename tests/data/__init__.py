"""The shipped data is what its card says, every validation error is one clear line naming the problem, and the splits never leak: the test set is held out before anything is learned."""
