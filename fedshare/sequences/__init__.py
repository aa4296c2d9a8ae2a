"""Sequence (next-item) recommenders on the clients: data, backbones, training, evaluation.

The CAU paper's setting (Sec. 5.1): a user's time-ordered interactions form one session, and a
session is one device. Pure torch / numpy / pandas; the Flower wiring lives elsewhere.
"""
