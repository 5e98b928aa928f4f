"""Writes the two notebooks (kept as a script here so their cells stay reviewable)."""
import nbformat as nbf

def nb(cells):
    n = nbf.v4.new_notebook()
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    n.cells = [nbf.v4.new_markdown_cell(c[1]) if c[0] == "md" else nbf.v4.new_code_cell(c[1]) for c in cells]
    return n

quick = nb([
    ("md", "# apo_jax quickstart: the miniature paper on a CPU, GPU or TPU\n\n"
           "Installs apo_jax, runs one cell of the paper's grid (CLAIR pairs × APO-zero) as a miniature that "
           "needs no weights and no network, and plots Figure 4. On Colab, run the install cell first; "
           "on a TPU runtime JAX picks the TPU up by itself."),
    ("code", "import os, sys\n"
             "IN_COLAB = 'google.colab' in sys.modules\n"
             "REPO = os.environ.get('APO_JAX_REPO', '')  # your clone's git URL, on a fresh Colab runtime\n"
             "if IN_COLAB and REPO:\n"
             "    !git clone -q $REPO apo_jax && pip install -q -e apo_jax\n"
             "    os.chdir('apo_jax')\n"
             "# Tests run this notebook with APO_JAX_NOTEBOOK_TINY=1: the CI-sized miniature\n"
             "TINY = os.environ.get('APO_JAX_NOTEBOOK_TINY') == '1'\n"
             "WORKDIR = os.environ.get('APO_JAX_NOTEBOOK_WORKDIR', 'workdirs/notebook')"),
    ("code", "import jax\n"
             "from experiments.configs import grid\n"
             "from experiments.mini.pipeline import run as run_mini\n"
             "print('devices:', jax.devices())\n"
             "config = grid.get_config('clair_apo_zero:' + ('tiny' if TINY else 'mini'))\n"
             "config.workdir = f'{WORKDIR}/clair_apo_zero'\n"
             "config.train.progress = False\n"
             "summary = run_mini(config)\n"
             "acc = summary['accuracy']  # greedy and sampled, each with its standard error\n"
             "print('greedy accuracy: M', acc['before']['greedy'], '-> aligned', acc['after']['greedy'],\n"
             "      '| positive control', acc['control']['greedy'])"),
    ("md", "## Figure 4: held-out likelihoods and rewards of the winning and losing answers"),
    ("code", "import json, pathlib\n"
             "import matplotlib.pyplot as plt\n"
             "rows = [json.loads(x) for x in pathlib.Path(config.workdir, 'metrics.jsonl').read_text().splitlines()]\n"
             "ev = [r for r in rows if 'eval/logps/chosen' in r]\n"
             "steps = [r['step'] for r in ev]\n"
             "fig, ax = plt.subplots(1, 2, figsize=(9, 3))\n"
             "for a, key in zip(ax, ('logps', 'rewards')):\n"
             "    a.plot(steps, [r[f'eval/{key}/chosen'] for r in ev], label='chosen')\n"
             "    a.plot(steps, [r[f'eval/{key}/rejected'] for r in ev], label='rejected')\n"
             "    a.set_title(f'held-out {key}'); a.set_xlabel('step'); a.legend()\n"
             "assert len(ev) >= 1\n"
             "print(pathlib.Path(config.workdir, 'results.md').read_text())"),
])

clair = nb([
    ("md", "# CLAIR data: minimal revisions by a stronger model\n\n"
           "Revises a handful of a model's answers through an OpenAI-compatible API with the paper's prompt, "
           "then shows the diffs and how contrastive the pairs are. Set `OPENAI_API_KEY` to use the real API. "
           "Without a key (and in the tests) a loopback server replays ten real GPT-4 responses recorded "
           "from the paper's pipeline, so the notebook needs no key and costs nothing."),
    ("code", "import json, os, pathlib, threading, http.server\n"
             "DATA = pathlib.Path('tests/data') if pathlib.Path('tests/data').exists() else pathlib.Path('../tests/data')\n"
             "ROWS = [json.loads(x) for x in (DATA / 'clair_gpt4_revisions.jsonl').read_text().splitlines()]\n"
             "WORK = pathlib.Path(os.environ.get('APO_JAX_NOTEBOOK_WORKDIR', 'workdirs/notebook')) / 'clair'\n"
             "WORK.mkdir(parents=True, exist_ok=True)\n"
             "answers = WORK / 'answers.jsonl'\n"
             "answers.write_text(''.join(json.dumps({'prompt': r['prompt'], 'response': r['rejected']}) + '\\n' for r in ROWS[:5]))\n"
             "print(len(ROWS[:5]), 'answers of Llama-3-8B-Instruct to revise')"),
    ("code", "REPLAY = not os.environ.get('OPENAI_API_KEY') or os.environ.get('APO_JAX_NOTEBOOK_TINY') == '1'\n"
             "if REPLAY:  # a local OpenAI-compatible server answering with the recorded GPT-4 responses\n"
             "    class Replay(http.server.BaseHTTPRequestHandler):\n"
             "        protocol_version = 'HTTP/1.1'\n"
             "        def log_message(self, *a): pass\n"
             "        def do_POST(self):\n"
             "            body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))\n"
             "            text = body['messages'][-1]['content']\n"
             "            row = next(r for r in ROWS if r['rejected'] in text)\n"
             "            raw = json.dumps(row['reviser_response']).encode()\n"
             "            self.send_response(200); self.send_header('Content-Type', 'application/json')\n"
             "            self.send_header('Content-Length', str(len(raw))); self.end_headers(); self.wfile.write(raw)\n"
             "    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Replay)\n"
             "    threading.Thread(target=server.serve_forever, daemon=True).start()\n"
             "    BASE_URL = f'http://127.0.0.1:{server.server_address[1]}/v1'\n"
             "else:\n"
             "    BASE_URL = 'https://api.openai.com/v1'\n"
             "print('reviser endpoint:', BASE_URL)"),
    ("code", "from apo_jax.client import ClientConfig\n"
             "from apo_jax.data.clair.revise import revise\n"
             "pairs_path = WORK / 'pairs.jsonl'\n"
             "summary = revise(answers, pairs_path, ClientConfig(base_url=BASE_URL, model='gpt-4-0125-preview'), progress=False)\n"
             "print(summary)\n"
             "assert summary['revised'] == 5"),
    ("md", "## What the reviser changed"),
    ("code", "import difflib\n"
             "pairs = [json.loads(x) for x in pairs_path.read_text().splitlines()]\n"
             "p = pairs[0]\n"
             "diff = difflib.unified_diff(p['rejected'].splitlines(), p['chosen'].splitlines(), 'answer', 'revision', lineterm='', n=0)\n"
             "print('\\n'.join(list(diff)[:40]))"),
    ("md", "## How contrastive the pairs are (APO paper, Table 1)"),
    ("code", "from apo_jax.data.clair.stats import pair_stats, table\n"
             "result = {'clair (5 GPT-4 revisions)': pair_stats([(p['chosen'], p['rejected']) for p in pairs])}\n"
             "print(table(result))"),
])
nbf.write(quick, "notebooks/quickstart.ipynb")
nbf.write(clair, "notebooks/clair_data.ipynb")
