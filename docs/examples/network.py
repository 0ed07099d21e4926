"""The pattern of docs/dashboard.md's pictures, over the agents of ``aiflow dashboard --demo``.

aiflow graph draw docs/examples/network.py:graph --out graph.png --broker URL   # tiers from presence
aiflow run docs/examples/network.py:graph --task "What is 17*23?" --broker URL --timeline timeline.png
"""

from topologies import cascade, ensemble

# the phone answers alone when it is sure; else the edge; else a vote of two edge models and the cloud
graph = cascade(
    ["phone", "edge-a", ensemble(["edge-b", "edge-c", "cloud"], aggregate="vote", name="vote")],
    accept="confidence>=0.8",
    name="escalation",
)
