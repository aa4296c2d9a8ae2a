"""SecAgg+ for the learning rounds' train replies: what both sides of the protocol compute.

With ``defence = "secagg"`` (:class:`fedshare.runconfig.SecAggSettings`) the server learns only
the sum of a round's train replies, and a node that drops out after the key exchange does not
spoil it (SecAgg+, Bell et al., CCS 2020). Flower 1.42 ships the protocol as
``SecAggPlusWorkflow`` and ``secaggplus_mod``, which drive it through the legacy fit context;
this app speaks the Message API, so the stages are ours (:mod:`strategies.secagg` on the
server, :mod:`clients.secagg` on the nodes, the messages in :mod:`fedshare.protocol`) and the
cryptography is Flower's, called here:

- key agreement: ECDH key pairs on SECP384R1 (``generate_key_pairs``) and a shared key derived
  with HKDF (``generate_shared_key``);
- Shamir secret sharing of the self-mask seed and of the pairwise-mask private key
  (``create_shares``, ``combine_shares``);
- authenticated symmetric encryption of each share pair to its holder (Fernet: ``encrypt``,
  ``decrypt``) and the plaintext's layout (``share_keys_plaintext_concat`` / ``_separate``);
- quantisation (``quantize``: clipping and stochastic rounding);
- pseudo-random mask expansion (``pseudo_rand_gen``; it folds the seed to 32 bits, as
  Flower's own SecAgg+ does: a server spending 2**32 expansions could strip one mask, so a
  stronger expansion would replace this one call).

Ours: the vector layout (:func:`encode`, :func:`decode`), the neighbour ring
(:func:`neighbours`), the mask arithmetic (modulo ``2**modulus_bits``, reduced after every
addition so int64 holds any modulus up to 2**62; Flower's adds first and fits 2**32 only) and
the unmasking (:func:`unmask`).

Vector layout (one int64 vector per node, ``F + I + 2`` long, ``F = items x dim``, ``I =
items``): the node's ``weight (table - start) / scale`` flattened row-major, clipped to
``[-clip, clip]`` and quantised to ``[0, Q]`` (``Q = 2**quantization_bits``); then its per-row
weights, its weight and its trained-user count as exact integers (they are sums of |D_u|
counts). ``scale`` is the round's total weight bound W, the |I_local| of every user asked to
train, which the server knows from the share round: each node's part, and the sum, then lie
within the clip whenever no user's update moves a coordinate by more than it.

Precision: stochastic rounding errs by less than one quantum ``2 clip / Q`` per node and
coordinate, so with ``n`` summed nodes every coordinate of ``S_delta = sum_n weight_n (table_n
- start)`` is within ``n W 2 clip / Q`` of the plain sum (the defaults, ``clip = 8``, ``Q =
2**30``: ``n W 1.5e-8``). The synthetic table ``start + S_delta / S_w`` errs by at most
``n (W / S_w) 2 clip / Q`` (``eq16``; ``W = S_w`` when every asked node answers), the row-wise
step of ``touched`` aggregation by ``n (W / S_rw[i]) 2 clip / Q``. Row weights, weights and
user counts are exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)
from torch import Tensor

from fedshare.federated.population import NodeUpdate
from fedshare.runconfig import SecAggSettings


@dataclass(frozen=True)
class Keys:
    """A node's two key pairs of one round (PEM bytes): ``mask`` agrees the pairwise masks with
    its neighbours, ``share`` the keys that encrypt its secret shares to them."""

    mask_private: bytes
    mask_public: bytes
    share_private: bytes
    share_public: bytes


def new_keys() -> Keys:
    (mask_sk, mask_pk), (share_sk, share_pk) = generate_key_pairs(), generate_key_pairs()
    return Keys(private_key_to_bytes(mask_sk), public_key_to_bytes(mask_pk),
                private_key_to_bytes(share_sk), public_key_to_bytes(share_pk))


def neighbours(nodes: Iterable[int], num_shares: int, rng: np.random.Generator
               ) -> dict[int, list[int]]:
    """Each node's neighbourhood, itself included: ``num_shares // 2`` nodes on either side of a
    ring in a random order (every node's when there are no more nodes than ``num_shares``).
    The relation is symmetric, as pairwise masks need."""
    ids = sorted(int(node) for node in nodes)  # uint64 ids: permute positions, not values
    order = [ids[i] for i in rng.permutation(len(ids))]
    count, half = len(order), num_shares // 2
    if count <= num_shares:
        return {node: sorted(order) for node in order}
    return {node: sorted(order[(i + offset) % count] for offset in range(-half, half + 1))
            for i, node in enumerate(order)}


def _key(private: bytes, public: bytes) -> bytes:
    return generate_shared_key(bytes_to_private_key(private), bytes_to_public_key(public))


def share_secrets(own: int, keys: Keys, seed: bytes, nodes: Sequence[int],
                  share_publics: Sequence[bytes], threshold: int
                  ) -> tuple[dict[int, bytes], tuple[bytes, bytes]]:
    """Split the self-mask ``seed`` and the mask private key among ``nodes`` (``own``
    included; ``share_publics`` are their share keys, in order) so that ``threshold`` shares
    rebuild either. Returns each other node's encrypted pair of shares, by node, and the pair
    ``own`` keeps."""
    seed_shares = create_shares(seed, threshold, len(nodes))
    key_shares = create_shares(keys.mask_private, threshold, len(nodes))
    sealed, kept = {}, (b"", b"")
    for node, public, seed_share, key_share in zip(nodes, share_publics, seed_shares,
                                                   key_shares, strict=True):
        if node == own:
            kept = (seed_share, key_share)
            continue
        plaintext = share_keys_plaintext_concat(own, node, seed_share, key_share)
        sealed[node] = encrypt(_key(keys.share_private, public), plaintext)
    return sealed, kept


def open_shares(own: int, keys: Keys, sealed: Mapping[int, bytes],
                share_publics: Mapping[int, bytes]) -> dict[int, tuple[bytes, bytes]]:
    """The (seed share, key share) pairs other nodes sealed to ``own``, by sender; raises
    ``ValueError`` for a sender that is no neighbour or a pair sealed for another node."""
    opened = {}
    for source, ciphertext in sealed.items():
        if source not in share_publics or source == own:
            raise ValueError(f"shares from node {source}, which is no neighbour")
        plaintext = decrypt(_key(keys.share_private, share_publics[source]), ciphertext)
        sender, receiver, seed_share, key_share = share_keys_plaintext_separate(plaintext)
        if (sender, receiver) != (source, own):
            raise ValueError(f"shares of node {sender} for node {receiver} came from {source}")
        opened[source] = (seed_share, key_share)
    return opened


def vector_length(num_items: int, dim: int) -> int:
    return num_items * dim + num_items + 2


def encode(update: NodeUpdate, start: Tensor, scale: float, settings: SecAggSettings
           ) -> tuple[np.ndarray, int]:
    """A node's update in the layout of the module docstring, and how many coordinates had to
    be clipped. Raises ``ValueError`` on a non-finite update."""
    delta = update.weight * (update.table.double() - start.double()) / scale
    if not bool(torch.isfinite(delta).all()) or not bool(torch.isfinite(update.row_weight)
                                                         .all()):
        raise ValueError("a non-finite update cannot be summed")
    values = delta.numpy().ravel()
    clipped = int((np.abs(values) > settings.clip).sum())
    quantised = quantize([values], settings.clip, settings.quantization)[0].astype(np.int64)
    counts = np.concatenate([np.rint(update.row_weight.double().numpy()),
                             [round(update.weight), update.num_users]]).astype(np.int64)
    return np.concatenate([quantised, counts]), clipped


def decode(total: np.ndarray, count: int, start: Tensor, scale: float,
           settings: SecAggSettings) -> NodeUpdate:
    """The sum of ``count`` nodes' encoded vectors as one node's update: ``weight = S_w``,
    ``row_weight = S_rw``, ``table = start + S_delta / S_w`` (``start`` when ``S_w = 0``).
    Raises ``ValueError`` when the sum lies outside what ``count`` honest nodes can add up to
    (a node sent values outside its range, or a share was wrong)."""
    num_items, dim = start.shape
    if total.shape != (vector_length(num_items, dim),):
        raise ValueError(f"a sum of {total.shape} values, expected {vector_length(*start.shape)}")
    floats, counts = total[:num_items * dim], total[num_items * dim:]
    if (floats < 0).any() or (floats > count * settings.quantization).any() or (
            counts < 0).any() or (counts[:-1] > scale).any():
        raise ValueError(f"the unmasked sum lies outside what {count} nodes can add up to")
    quantum = 2 * settings.clip / settings.quantization
    delta = (floats.astype(np.float64) * quantum - count * settings.clip) * scale
    weight = float(counts[-2])
    table = start.double() + (torch.from_numpy(delta.reshape(num_items, dim)) / weight
                              if weight > 0 else 0.0)
    return NodeUpdate(table.float(), weight, torch.from_numpy(counts[:-2].astype(np.float32)),
                      int(counts[-1]))


def _expand(seed: bytes, length: int, modulus: int) -> np.ndarray:
    return pseudo_rand_gen(seed, modulus, [(length,)])[0]


def mask(vector: np.ndarray, own: int, seed: bytes, keys: Keys,
         partners: Mapping[int, bytes], modulus: int) -> np.ndarray:
    """``vector`` plus its self mask (from ``seed``) plus, per partner (its mask public key by
    node), the pairwise mask agreed with it: added when ``own`` is the larger id, subtracted
    otherwise, so each pair's masks cancel in the sum. Modulo ``modulus``."""
    low = modulus - 1  # a power of two: & is the modulo, also of negative int64
    masked = (vector + _expand(seed, len(vector), modulus)) & low
    for node, public in partners.items():
        pair = _expand(_key(keys.mask_private, public), len(vector), modulus)
        masked = (masked + pair if own > node else masked - pair) & low
    return masked


def reconstruct(shares: Sequence[bytes], threshold: int) -> bytes:
    """A secret from at least ``threshold`` of its shares; ``ValueError`` otherwise."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, {threshold} needed")
    return combine_shares(list(shares))


def unmask(total: np.ndarray, seeds: Mapping[int, bytes], dropped: Mapping[int, bytes],
           partners: Mapping[int, Iterable[int]], mask_publics: Mapping[int, bytes],
           modulus: int) -> np.ndarray:
    """The plain sum from the masked sum of the surviving nodes: remove each survivor's self
    mask (``seeds``, its rebuilt seed by node) and the pairwise masks survivors agreed with a
    ``dropped`` node (its rebuilt mask private key by node; ``partners``: each survivor's mask
    partners; ``mask_publics``: every node's mask public key). Raises ``ValueError`` for a
    rebuilt key that does not match its node's public key (a wrong share)."""
    low, length = modulus - 1, len(total)
    plain = total.copy()
    for seed in seeds.values():
        plain = (plain - _expand(seed, length, modulus)) & low
    for node, private in dropped.items():
        if public_key_to_bytes(bytes_to_private_key(private).public_key()) != \
                mask_publics.get(node):
            raise ValueError(f"the rebuilt mask key of node {node} is wrong")
        for survivor, nodes in partners.items():
            if node in nodes:  # the survivor masked with it: undo what it did
                pair = _expand(_key(private, mask_publics[survivor]), length, modulus)
                plain = (plain - pair if survivor > node else plain + pair) & low
    return plain


def add(vectors: Iterable[np.ndarray], length: int, modulus: int) -> np.ndarray:
    """The sum of masked vectors modulo ``modulus``."""
    total = np.zeros(length, dtype=np.int64)
    for vector in vectors:
        total = (total + vector) & (modulus - 1)
    return total
