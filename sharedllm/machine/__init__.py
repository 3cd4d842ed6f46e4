# SPDX-License-Identifier: AGPL-3.0-or-later
"""A machine of the mesh: what each worker of it holds (:mod:`.agent`), the actor the scheduler pins on one of them
(:mod:`.actor`), the supervisor of its rpc-server (:mod:`.server`) with its relay (:mod:`.relay`) and tensor cache
(:mod:`.cache`), and what its reported state says (:mod:`.state`, pure: the client and the scheduler read it).

Nothing is imported here: :mod:`.state` must stay importable without the rest.
"""
