"""Cliques: prompts ranked by the attack, each clique of near-identical generations beside the
training images nearest to its medoid. The sliders recount from the run's cached distances."""

from __future__ import annotations

import streamlit as st

from core import results, rethreshold, runs, views
from core.errors import MemauditError
from core.store import Workspace
from dashboard import ui

MAX_MEMBERS = 18    # generations shown per clique group
NEIGHBOURS = 5      # nearest training images shown per group
THUMB, NEIGHBOUR, COMPARE = 96, 128, 240  # CSS pixels

st.title("Cliques")
ws = ui.workspace()
run = ui.run_id(ws)
params = runs.run_params(ws, run)
try:
    cache = ui.run_cache(str(ws.root), run)
except MemauditError as e:
    st.error(str(e))
    st.stop()


@st.cache_data(show_spinner=False, max_entries=256)
def recount(root: str, run: int, tau: float, k: int, delta: float, grid: int) -> rethreshold.Recount:
    return ui.run_cache(root, run).recount(tau, k, delta, grid)


@st.cache_data(show_spinner=False, max_entries=256)
def groups(root: str, run: int, prompt_id: int, tau: float, min_size: int, max_groups: int, grid: int) -> list[rethreshold.GroupView]:
    return rethreshold.prompt_groups(Workspace(root), run, prompt_id, tau=tau, min_size=min_size, max_groups=max_groups,
                               grid=grid, cache=ui.run_cache(root, run))


@st.cache_data(show_spinner=False)
def labelled_prompts(root: str, run: int, events: int) -> set[int]:
    return results.labelled_prompts(Workspace(root), run)


taus = [float(t) for t in cache.taus]
max_k = max([params.min_clique, 20, *cache.prompt_count.values()])
c = st.columns([3, 3, 3, 2], vertical_alignment="bottom")
tau = c[0].select_slider("tau: edge threshold (tiled L2)", options=taus, value=cache.taus[cache.tau_index(params.edge_threshold)].item(),
                         key=f"cliques_tau_{run}", format_func=lambda t: f"{t:.3f}", persist_state="session",
                         help="Two generations of a prompt are linked when their tiled L2 is <= tau.")
k = c[1].slider("k: minimum clique size", 2, int(max_k), int(params.min_clique), key=f"cliques_k_{run}", persist_state="session",
                help="A prompt is flagged when its largest clique has at least k members.")
delta = c[2].slider("delta: extraction threshold (L2)", 0.0, max(0.5, float(params.delta)), float(params.delta), step=0.005,
                    format="%.3f", key=f"cliques_delta_{run}", persist_state="session",
                    help="A flagged prompt is an extraction when its medoid's nearest training image is within normalised L2 delta.")
grid_help = ("Tiled L2 is the largest normalised L2 over a G x G grid of tiles; 1 x 1 is plain L2, which links "
             "flat textures that are not copies (PAPER.md). Each grid the audit cached recounts instantly.")
if len(cache.grids) > 1:
    grid = c[3].select_slider("G: tile grid", options=cache.grids, value=cache.grid, key=f"cliques_grid_{run}",
                              format_func=lambda g: f"{g} x {g}", persist_state="session", help=grid_help)
else:
    grid = cache.grid
    c[3].caption(f"Tile grid {grid} x {grid}: the only grid this run cached; audit again with the grid_choices "
                 "setting (for example 1,2,4,8) to compare grids here.", help=grid_help)
shown = st.pills("Show only", ["flagged", "extracted", "unlabelled"], selection_mode="multi", key=f"cliques_filters_{run}",
                 persist_state="session")

rc = recount(str(ws.root), run, float(tau), int(k), float(delta), int(grid))
base = recount(str(ws.root), run, float(params.edge_threshold), int(params.min_clique), float(params.delta), cache.grid)
m = st.columns(4)
m[0].metric("Flagged prompts", rc.flagged, delta=rc.flagged - base.flagged or None, delta_color="off",
            help="prompts whose largest clique reaches k at tau, with tiled L2 on the chosen grid")
m[1].metric("Extracted prompts", rc.extracted, delta=rc.extracted - base.extracted or None, delta_color="off",
            help="flagged prompts whose largest clique's medoid lies within L2 <= delta of a training image")
m[2].metric("Text prompts", len(rc.prompts))
m[3].caption(f"Changes are counted against the run's own thresholds: tau {params.edge_threshold:g}, "
             f"k {params.min_clique}, delta {params.delta:g}, grid {cache.grid} x {cache.grid}. "
             "Moving a slider recounts from cached distances.")
if rc.clique_bounds:
    st.warning(f"{rc.clique_bounds} prompts' largest clique at tau {rc.tau:.3f} is a lower bound: the exact search stopped "
               "at its budget (setting clique_node_budget). Their flags can only rise with a larger budget; the table "
               "marks them “lower bound”.", icon=":material/warning:")
if rc.uncertain:
    st.warning(f"{rc.uncertain} flagged prompts are counted not extracted, but their medoid's nearest training image is not "
               "certified (the search stopped at nearest_budget) and could lie within delta. Raise nearest_budget and "
               "audit again to settle them.", icon=":material/warning:")

if not rc.prompts:
    st.info("This run has no text prompts (unconditional generations are judged one by one): review them on the Review page.")
    st.stop()

rows = rc.prompts
if "flagged" in (shown or []):
    rows = [r for r in rows if r.flagged]
if "extracted" in (shown or []):
    rows = [r for r in rows if r.extracted]
if "unlabelled" in (shown or []):
    done = labelled_prompts(str(ws.root), run, ws.counts()["label_events"])
    rows = [r for r in rows if r.prompt_id not in done]
if not rows:
    st.info("No prompt matches these filters at these thresholds.")
    st.stop()

MAX_ROWS = 2000
if len(rows) > MAX_ROWS:
    st.caption(f"Showing the {MAX_ROWS} highest-ranked of {len(rows)} prompts; the filters narrow the list.")
    rows = rows[:MAX_ROWS]
table = st.dataframe(
    [{"#": i, "prompt": r.prompt, "generations": r.generations,
      "largest clique": r.largest_clique, "clique": "exact" if r.clique_exact else "lower bound",
      "flagged": r.flagged, "extracted": r.extracted,
      "mean tiled L2": r.mean_distance if r.largest_clique > 1 else None, "best L2": r.best_l2,
      "nearest": "certified" if r.nearest_certified else "best found"}
     for i, r in enumerate(rows, 1)],
    hide_index=True, height="auto" if len(rows) <= 8 else 320, on_select="rerun", selection_mode="single-row", key="cliques_table",
    column_config={"#": st.column_config.NumberColumn(width="small"),
                   "prompt": st.column_config.TextColumn(width="large"),
                   "mean tiled L2": st.column_config.NumberColumn(format="%.4f"),
                   "best L2": st.column_config.NumberColumn(format="%.4f"),
                   "clique": st.column_config.TextColumn(
                       help="exact: the largest clique's size is certain; lower bound: the search stopped at "
                            "clique_node_budget, a larger clique may exist"),
                   "nearest": st.column_config.TextColumn(
                       help="certified: the training image at best L2 is the nearest of the whole training set; "
                            "best found: the search stopped at nearest_budget, a nearer one may exist")})
picked = table.selection.rows if table is not None and hasattr(table, "selection") else []
row = rows[picked[0]] if picked and picked[0] < len(rows) else rows[0]

st.subheader(f"“{row.prompt}”")
st.caption(f"{row.generations} generations · largest clique {row.largest_clique} at tau {rc.tau:.3f}, grid {rc.grid} x {rc.grid} · "
           f"{'flagged' if row.flagged else 'not flagged'} · {'extracted' if row.extracted else 'not extracted'}"
           + ("" if picked else " · click a row above to choose another prompt"))

try:
    found = groups(str(ws.root), run, row.prompt_id, float(rc.tau), int(min(params.group_min_size, k)), int(params.max_groups),
                   rc.grid)
except MemauditError as e:
    st.error(str(e))
    st.stop()
if not found:
    st.info(f"No clique of {min(params.group_min_size, k)} or more generations at tau = {rc.tau:.3f} on the {rc.grid} x {rc.grid} grid.")
    st.stop()

for gi, g in enumerate(found):
    nearest = g.neighbours[0] if g.neighbours else None
    verdict = [f"{g.size if g.exact else f'at least {g.size}'} generations", f"mean tiled L2 {g.mean_distance:.4f}",
               "flagged" if g.size >= k else f"below k = {k}"]
    if nearest is not None:
        verdict.append(f"nearest training L2 {nearest.l2:.4f} ({'<=' if nearest.l2 <= delta else '>'} delta)"
                       + ("" if g.nearest_certified else f", not certified: the true nearest is >= {g.nearest_lower:.4f}"))
    with st.expander(f"Group {gi + 1}: " + " · ".join(verdict), expanded=gi == 0):
        left, right = st.columns([5, 6], gap="medium")
        with left:
            st.markdown("**Generations** (★ the medoid)")
            members = [g.medoid] + [m for m in g.members if m.id != g.medoid.id]
            cols = st.columns(6)
            for j, gen in enumerate(members[:MAX_MEMBERS]):
                with cols[j % 6]:
                    ui.show_image(ws, gen.path, THUMB, caption=("★ " if j == 0 else "") + f"seed {gen.seed}", fill=True)
            if len(members) > MAX_MEMBERS:
                st.caption(f"and {len(members) - MAX_MEMBERS} more")
        with right:
            st.markdown("**Nearest training images** of the medoid (identical files shown once)"
                        + (" · the first is the certified nearest of the whole training set" if g.nearest_certified else
                           " · not certified: the search stopped at its budget"))
            cols = st.columns(NEIGHBOURS)
            for j, n in enumerate(views.distinct_neighbours(g.neighbours)[:NEIGHBOURS]):
                with cols[j]:
                    ui.show_image(ws, n.training.path, NEIGHBOUR, fill=True)
                    st.caption(f"**{'≤δ ' if n.l2 <= delta else ''}L2 {n.l2:.4f}**  \ntiled {rc.grid}x{rc.grid} {n.tiled_l2:.4f}  \n"
                               f"sim {n.similarity:.3f}  \ndup k {n.training.duplicate_count}")
        if g.neighbours:
            st.markdown("**Compare**")
            sel = st.columns([2, 3])
            rank = sel[0].segmented_control(
                "Training image", list(range(min(NEIGHBOURS, len(g.neighbours)))), default=0, key=f"cmp_rank_{row.prompt_id}_{gi}",
                format_func=lambda i: f"#{i + 1}", required=True)
            mode = sel[1].segmented_control("View", ["overlay", "blink"], default="blink", required=True,
                                            key=f"cmp_mode_{row.prompt_id}_{gi}")
            n = g.neighbours[rank or 0]
            pixels = ui.pair_or_warn(ws, g.medoid.path, n.training.path)
            if pixels is not None:
                gen_arr, train_arr = pixels
                cols = st.columns(4)
                with cols[0]:
                    ui.show_image(ws, g.medoid.path, COMPARE, caption=f"medoid · seed {g.medoid.seed}")
                with cols[1]:
                    ui.show_image(ws, n.training.path, COMPARE,
                                  caption=f"training #{n.rank + 1} · {n.training.caption or n.training.source_path}")
                with cols[2]:
                    diff, vmax = views.difference_image(gen_arr, train_arr)
                    st.image(views.upscale_nearest(diff, COMPARE), width=COMPARE, output_format="PNG",
                             caption=f"|difference|: black 0, pale yellow ≥ {vmax:.2f} · L2 {n.l2:.4f} · tiled {rc.grid}x{rc.grid} {n.tiled_l2:.4f}")
                with cols[3]:
                    if mode == "overlay":
                        alpha = st.slider("training weight", 0.0, 1.0, 0.5, 0.05, key=f"cmp_alpha_{row.prompt_id}_{gi}")
                        st.image(views.upscale_nearest(ui.to_uint8(views.blend(gen_arr, train_arr, alpha)), COMPARE),
                                 width=COMPARE, caption=f"overlay: {1 - alpha:.0%} generation + {alpha:.0%} training",
                                 output_format="PNG")
                    else:
                        st.html(ui.blink_html(gen_arr, train_arr, COMPARE))
