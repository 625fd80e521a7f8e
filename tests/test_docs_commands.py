"""Every command in README.md and docs/*.md runs to its end, at a smoke size, through its command
line (issues 20 and 21); the cluster commands of docs/cluster.md run against the local servers.

1. Extraction: each line of a ```bash / ```sh / ```shell block (and of an unlabelled block whose
   first line starts with a known program) is a command once continuation lines, quotes spanning
   lines, here-documents and for/done loops are joined and comments are stripped. A line whose first
   word (after NAME=value assignments) is not in PROGRAMS is program output and skipped. An
   unlabelled block right after a shell block is that block's last command's output; one that
   starts with ``error:`` says the command fails on purpose.
2. COMMANDS accounts for each command: Run (how: smoke flags appended, where argparse keeps the last
   value, and substitutions) or NotHere (why). A command the table does not know fails
   test_every_documented_command_is_in_the_table, and so does an entry no document has any more.
3. Each document's commands run in order in one working folder, each to its end:
   - ``python <script>.py`` (jobs/, datasets/, docs/examples/) runs in this process: runpy with
     sys.argv from bash's own word expansion, in the document's working folder and environment,
     on the module's one Ray cluster (``fdrl.distributed.cluster.connect`` reuses it);
   - ``ray job submit ... -- python ...`` runs its inner command the same way, as the head would:
     in the head's environment plus the runtime env's env_vars, with the entrypoint expanded by
     the head's shell. The submit wrapper itself is tested by tests/test_job_submit.py;
   - ``ray exec cluster.yaml CMD`` runs CMD in bash in the head's stand-in home; ``ray rsync-up``
     copies between the laptop's and the head's stand-in homes;
   - anything else runs in bash; its exports, assignments and ``cd`` carry on to later commands.
   README.md, compose.md and dgflow.md run from the repository root: they share one stand-in
   checkout, in which the demo (what ``./dev demo`` runs) ran first at smoke size.
4. Inputs the docs name on the user's disk are built in their real formats (tests/fake_inputs.py)
   in stand-in homes; YOUR-BUCKET is a fresh bucket on the moto S3 server, the head's MLflow a
   fresh basic-auth ``mlflow server`` (fresh_mlflow_server).

Each command's line, wall time and outcome are printed as a table at the end of its document's
test (``-s`` or ``-rP`` shows it); a failure names the document, the line and the command.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import list2cmdline
from typing import Callable, Optional

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent  # the venv this test runs in: the checkout's .venv
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]

# ============================================================================== extraction

SHELL_LANGS = {"bash", "sh", "shell"}
# First words of a command; any other first word in a shell block is program output.
PROGRAMS = {"python", "python3", ".venv/bin/python", "./dev", "ray", "aws", "mlflow", "export", "cd",
            "mkdir", "printf", "ssh", "scp", "chmod", "pip", "cat", "for", "echo", "sed", "source",
            "curl", "git", "ls"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
OPENERS, CLOSERS = {"for", "while", "until", "if", "case"}, {"done", "fi", "esac"}


@dataclass
class Command:
    doc: str
    line: int  # first line in the document
    text: str  # as bash would read it: continuations joined, comments gone
    output: list[str] = field(default_factory=list)  # the documented output, if shown

    @property
    def key(self) -> str:
        return normalise(self.text)

    @property
    def expected_error(self) -> Optional[str]:
        """The first words of the documented ``error:`` line, when the docs show a failure."""
        first = next((line.strip() for line in self.output if line.strip()), "")
        return " ".join(first.split()[:6]) if first.startswith("error:") else None

    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.key}"


def normalise(text: str) -> str:
    return " ".join(text.split())


def strip_comment(line: str, quote: str) -> tuple[str, str]:
    """``line`` without a comment outside quotes, and the quote still open at its end ('' if none)."""
    out, i = [], 0
    while i < len(line):
        c = line[i]
        if quote == "'":
            quote = "" if c == "'" else quote
        elif c == "\\" and i + 1 < len(line):
            out.append(line[i:i + 2])
            i += 2
            continue
        elif quote == '"':
            quote = "" if c == '"' else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            break
        out.append(c)
        i += 1
    return "".join(out), quote


def first_word(text: str) -> str:
    words = text.split()
    return next((w for w in words if not ASSIGNMENT.match(w)), "")


def is_command(text: str) -> bool:
    return bool(ASSIGNMENT.match(text.strip())) or first_word(text) in PROGRAMS


def fenced_blocks(text: str):
    """(language, first content line number, content lines, closing fence line number) per block.
    A block ends only at a fence of its own kind and at least its length, so a ```json block
    inside a list does not flip the state."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body, j = [], i + 1
        while j < len(lines) and not close.match(lines[j]):
            line = lines[j]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            j += 1
        yield lang, i + 2, body, j + 1
        i = j + 1


def shell_commands(doc: str, start: int, body: list[str]) -> tuple[list[Command], list[str]]:
    """The commands of one shell block, and the lines skipped as output."""
    commands, skipped = [], []
    pending, first, quote, heredoc, depth, continued = "", 0, "", None, 0, False
    for k, raw in enumerate(body):
        if heredoc is not None:  # a here-document's body is kept verbatim
            pending += "\n" + raw
            if raw.strip() != heredoc:
                continue
            heredoc = None
        else:
            in_quote = bool(quote)
            kept, quote = strip_comment(raw, quote)
            if not pending:
                if not kept.strip():
                    continue
                first, pending = start + k, kept.rstrip()
            elif continued:  # after a backslash-newline: the same line for bash
                pending += kept.strip() if not in_quote else kept.rstrip()
            else:  # a quote, loop or here-document goes on: the newline is part of it
                pending += "\n" + kept.rstrip()
            continued = False
            words = kept.split()
            marker = HEREDOC.search(kept)
            if marker and not quote:
                heredoc = marker.group(1)
                continue
            if quote:  # a quoted string goes on over the next line (``ray exec '...'``)
                continue
            if pending.endswith("\\"):
                pending, continued = pending[:-1].rstrip() + " ", True
                continue
            depth += (words[0] in OPENERS) - (words[0] in CLOSERS) if words else 0
            if depth > 0:
                continue
        text = pending.strip()
        if is_command(text):
            commands.append(Command(doc, first, text))
        else:
            skipped.append(f"{doc}:{first}: {text}")
        pending = ""
    return commands, skipped


def extract(doc: str, text: str) -> tuple[list[Command], list[str]]:
    """Every command of a markdown text, and the shell-block lines skipped as output."""
    lines = text.splitlines()
    commands, skipped, after_shell = [], [], None
    for lang, start, body, end in fenced_blocks(text):
        head = next((line for line in body if line.strip() and not line.lstrip().startswith("#")), "")
        if lang in SHELL_LANGS or (lang == "" and is_command(head)):
            found, dropped = shell_commands(doc, start, body)
            commands += found
            skipped += dropped
            after_shell = end if found else None
            continue
        # An unlabelled block right after a shell block (nothing but blank lines between) is
        # the output of that block's last command.
        if lang == "" and after_shell is not None and commands and \
                not any(line.strip() for line in lines[after_shell:start - 2]):
            commands[-1].output = body
        after_shell = None
    return commands, skipped


def documented() -> list[Command]:
    return [c for doc in DOCS for c in extract(doc, (REPO / doc).read_text())[0]]


def demo_command() -> Command:
    """What ``./dev demo`` runs (its case in ./dev), with $VENV as .venv."""
    text = (REPO / "dev").read_text()
    m = re.search(r"^\s*demo\)[^\n]*?exec \$VENV/bin/python ([^\s\"]+)", text, re.M)
    assert m, "./dev has no 'demo) ... exec $VENV/bin/python SCRIPT' case any more"
    line = text[:m.start()].count("\n") + 1
    return Command("dev (./dev demo, which README.md assumes has run)", line,
                   f".venv/bin/python {m.group(1)}")


# ================================================================================== the table

@dataclass(frozen=True)
class Run:
    add: str = ""  # smoke-size flags appended (argparse keeps the last value of a flag)
    sub: tuple = ()  # (documented text, replacement) pairs; {name} takes a place's value
    head: str = "head"  # ray exec / ray job submit: which head stand-in
    before: Optional[Callable] = None  # (place) -> None, e.g. an upload the text says to do
    check: Optional[Callable] = None  # (place, output) -> None, a check beyond the exit code


@dataclass(frozen=True)
class NotHere:
    why: str


# Smoke sizes. Training: 2 steps, 1 + 1 flow steps, a checkpoint and a grid, no FID.
TRAIN = ("--steps 2 --batch 8 --workers 2 --flow-steps 1 --extra-steps 1 --log-every 1 "
         "--checkpoint-every 2 --sample-every 2 --grid-size 4 --no-fid")
PREPARE = "--limit 64"
SAMPLE = "--n 4"
EVALUATE = "--n 16 --domain-n 16 --no-fid"  # FID on CPU is ~5 images/s; cluster.md keeps it on
REFINE = "--n 8 --steps 2"
GAN = "--steps 5 --width 16"
CORRECTOR = "--iters 3"
TUNE = "--num-samples 1 --steps 4 --max-concurrent 1 --metric kl"
CLASSIFIER = "--epochs 1 --limit 200"


def _check_json_file(name):
    def check(place, output):
        json.loads((place.cwd / name).read_text())  # the trust policy aws iam would read
    return check


def _check_secrets_file(place, output):
    path = Path(place.env["HOME"], ".config/fdrl/mlflow-server.env")
    assert path.stat().st_mode & 0o777 == 0o600, oct(path.stat().st_mode)
    keys = [line.split("=", 1)[0] for line in path.read_text().splitlines()]
    assert keys == ["MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"], keys


def _check_jobs_user(place, output):
    import requests

    server = place.server  # the new user may log in; it has no rights on others' experiments
    r = requests.get(server.uri + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=30,
                     auth=("fdrl-jobs", place.env["FDRL_MLFLOW_PASSWORD"]))
    assert r.status_code == 200, (r.status_code, r.text)


def _upload_inception_weights(place):
    """Step 7 says to upload the weights first with `aws s3 cp`: put torch-fidelity's file there."""
    from fdrl.data import storage

    local = place.root / "weights-inception-2015-12-05-6726825d.pth"
    place.fake_inputs.torch_fidelity_weights(local)
    storage.put_file(local, f"s3://{place.vars['bucket']}/weights/{local.name}")


def _check_restored_databases(place, output):
    home = place.heads["new head"].home / "mlflow"
    with contextlib.closing(sqlite3.connect(home / "mlflow.db")) as db:
        models = {row[0] for row in db.execute("select name from registered_models")}
    with contextlib.closing(sqlite3.connect(home / "basic_auth.db")) as db:
        users = {row[0] for row in db.execute("select username from users")}
    assert "fdrl-church" in models and {"admin", "fdrl-jobs"} <= users, (models, users)


NO_CLOUD = "needs an AWS account and a launched cluster; "
COMMANDS: dict[str, Run | NotHere] = {
    # --- README.md (after the demo) --------------------------------------------------------
    ".venv/bin/python datasets/prepare.py cifar10 ~/data/cifar-10-batches-py --out data/cifar10":
        Run(add=PREPARE),
    ".venv/bin/python jobs/fdrl_cifar10.py --data data/cifar10 --workers 4": Run(add=TRAIN),
    ".venv/bin/python datasets/prepare.py folder ~/my-images --out data/mine --resolution 32 "
    "--channels 1": Run(add=PREPARE),
    ".venv/bin/python jobs/fdrl_train.py --data data/mine --steps 1000": Run(add=TRAIN),
    ".venv/bin/python jobs/sample.py --model models:/fdrl-mnist@candidate --n 1000 --out runs/samples "
    "--seed 0 --workers 2": Run(add=SAMPLE),
    ".venv/bin/python jobs/evaluate.py --model models:/fdrl-mnist@candidate --out runs/eval "
    "--promote-if-better fd": Run(add=EVALUATE),
    ".venv/bin/python jobs/refine.py --model models:/fdrl-mnist@candidate --input "
    "runs/samples/samples.npy --steps 25 --out runs/refined": Run(add=REFINE),
    ".venv/bin/python jobs/tune_fdrl.py --num-samples 8 --steps 100 --extra-trial pairing=lr-kl,lr=1000":
        Run(add=TUNE),
    # --- docs/own-data.md -------------------------------------------------------------------
    "mkdir -p /tmp/userdata/demo && cd /tmp/userdata/demo": Run(),  # the folder: see PLACES
    "export FDRL_HOME=$PWD": Run(),
    "export PATH=$REPO/.venv/bin:$PATH": Run(),
    "python $REPO/docs/examples/make_digits.py": Run(),
    "python $REPO/datasets/prepare.py folder my-digits --out data/my-digits --resolution 8 --channels 1 "
    "--labels-from-folders": Run(),  # all 1797 digits: --limit would keep the 0s only
    "python $REPO/jobs/fdrl_train.py --data data/my-digits --dry-run": Run(),
    "python $REPO/jobs/fdrl_train.py --data data/my-digits --steps 300 --decay-steps 240 270 --no-hflip":
        Run(add=TRAIN),
    "python $REPO/jobs/sample.py --model models:/fdrl-my-digits@candidate --n 256 --out "
    "runs/my-digits-samples --seed 0 --workers 2": Run(add=SAMPLE),
    # No --classifier: it trains the per-dataset feature classifier (6 epochs, 1797 8x8 images).
    "python $REPO/jobs/evaluate.py --model models:/fdrl-my-digits@candidate --out runs/my-digits-eval "
    "--n 500": Run(add=EVALUATE),
    # The docs show these two failing (error: ...); the smoke flags keep a regression short.
    "python $REPO/jobs/fdrl_mnist.py --data data/my-digits": Run(add=TRAIN),
    "python $REPO/jobs/fdrl_train.py --data data/my-digits --gpu on --steps 10": Run(add=TRAIN),
    # --- docs/compose.md ---------------------------------------------------------------------
    ".venv/bin/python jobs/train_classifier.py --epochs 6": Run(add=CLASSIFIER),
    ".venv/bin/python jobs/sample.py --model models:/fdrl-mnist@candidate --classifier "
    "models:/classifier-mnist@candidate --label all --n 100 --phi 0.5 --out runs/cond": Run(add="--n 2"),
    ".venv/bin/python datasets/prepare.py sklearn-digits --out data/digits --shard-size 300":
        Run(add=PREPARE),
    ".venv/bin/python jobs/fdrl_translate.py --source data/digits --target data/mnist5k --steps 400":
        Run(add=TRAIN),
    ".venv/bin/python jobs/sample.py --model models:/fdrl-digits-to-mnist5k@candidate --input "
    "data/digits --out runs/translated": Run(),  # flows the 64 prepared digits
    # --- docs/dgflow.md ----------------------------------------------------------------------
    "python jobs/train_gan.py --dataset 25gaussians --seed 0": Run(add=GAN),
    # the run above is complete: resuming it registers its final checkpoint again
    "python jobs/train_gan.py --dataset 25gaussians --seed 0 --resume": Run(add=GAN),
    "python jobs/train_gan.py --dataset 25gaussians --seed 0 --gp-weight 0.1 "
    "--register-name gan-25gaussians-gp01": Run(add=GAN),
    "python jobs/refine.py --generator models:/gan-25gaussians@candidate --space data --f kl --n 5000 "
    "--out runs/r": Run(add=REFINE),
    "python jobs/refine.py --generator models:/gan-25gaussians@candidate --method dot --out runs/dot":
        Run(add=REFINE),
    "python jobs/refine.py --generator models:/gan-25gaussians@candidate --method ddls --out runs/ddls":
        Run(add=REFINE),
    "python jobs/refine.py --generator models:/gan-25gaussians@candidate --space data --steps auto "
    "--tol 1e-3 --out runs/auto": Run(add="--n 8 --max-steps 8"),  # keeps --steps auto
    "python jobs/train_gan.py --dataset mnist --steps 3000": Run(add=GAN),
    "python jobs/train_gan.py --dataset mnist --model vae --steps 3000": Run(add=GAN),
    "python jobs/train_corrector.py --generator models:/vae-mnist@candidate --reference "
    "models:/gan-mnist@candidate --iters 10000": Run(add=CORRECTOR),
    "python jobs/refine.py --generator models:/vae-mnist@candidate --space latent --out runs/vae-refined":
        Run(add=REFINE),
    # --- docs/cluster.md: 1. AWS resources --------------------------------------------------
    "export BUCKET=YOUR-BUCKET REGION=us-west-2": Run(),
    # The AWS CLI against the moto server (AWS_ENDPOINT_URL_S3); boto3's same call without it.
    "aws s3api create-bucket --bucket $BUCKET --region $REGION --create-bucket-configuration "
    "LocationConstraint=$REGION": Run(),
    "aws s3api put-bucket-lifecycle-configuration --bucket $BUCKET --lifecycle-configuration "
    "'{\"Rules\": [{\"ID\": \"abort-uploads\", \"Status\": \"Enabled\", \"Filter\": {}, "
    "\"AbortIncompleteMultipartUpload\": {\"DaysAfterInitiation\": 1}}]}'": Run(),
    "cat > ec2-trust.json <<'EOF' {\"Version\": \"2012-10-17\", \"Statement\": [{\"Effect\": \"Allow\", "
    "\"Principal\": {\"Service\": \"ec2.amazonaws.com\"}, \"Action\": \"sts:AssumeRole\"}]} EOF":
        Run(check=_check_json_file("ec2-trust.json")),
    "for role in fdrl-head fdrl-worker; do aws iam create-role --role-name $role "
    "--assume-role-policy-document file://ec2-trust.json aws iam put-role-policy --role-name $role "
    "--policy-name s3-bucket --policy-document file://s3-policy.json aws iam create-instance-profile "
    "--instance-profile-name $role aws iam add-role-to-instance-profile --instance-profile-name $role "
    "--role-name $role done":
        NotHere(NO_CLOUD + "IAM roles: here the moto user's keys in the environment stand in for "
                "the instance role"),
    "ACCOUNT=$(aws sts get-caller-identity --query Account --output text)": NotHere(NO_CLOUD + "IAM"),
    "aws iam attach-role-policy --role-name fdrl-head --policy-arn "
    "arn:aws:iam::aws:policy/AmazonEC2FullAccess": NotHere(NO_CLOUD + "IAM (the autoscaler's rights)"),
    "aws iam put-role-policy --role-name fdrl-head --policy-name pass-worker-role --policy-document "
    "\"{\\\"Version\\\": \\\"2012-10-17\\\", \\\"Statement\\\": [{\\\"Effect\\\": \\\"Allow\\\", "
    "\\\"Action\\\": \\\"iam:PassRole\\\", \\\"Resource\\\": \\\"arn:aws:iam::$ACCOUNT:role/fdrl-worker\\\"}]}\"":
        NotHere(NO_CLOUD + "IAM (the autoscaler's rights)"),
    "VPC=$(aws ec2 describe-vpcs --filters Name=is-default,Values=true --query 'Vpcs[0].VpcId' "
    "--output text)": NotHere(NO_CLOUD + "an EC2 VPC; every process here is on 127.0.0.1"),
    "SG=$(aws ec2 create-security-group --group-name fdrl-ray --description \"fdrl Ray cluster\" "
    "--vpc-id $VPC --query GroupId --output text)": NotHere(NO_CLOUD + "an EC2 security group"),
    "aws ec2 authorize-security-group-ingress --group-id $SG --protocol tcp --port 22 --cidr "
    "\"$(curl -s https://checkip.amazonaws.com)/32\"": NotHere(NO_CLOUD + "an EC2 security group"),
    "aws ec2 authorize-security-group-ingress --group-id $SG --protocol tcp --port 0-65535 "
    "--source-group $SG": NotHere(NO_CLOUD + "an EC2 security group"),
    "echo $SG": NotHere("prints the security group id of the two commands above"),
    # --- 2. MLflow secrets and the cluster --------------------------------------------------
    "export MLFLOW_AUTH_ADMIN_PASSWORD=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')":
        Run(),  # then pinned to the head server's password: see PLACES
    "export MLFLOW_FLASK_SERVER_SECRET_KEY=$(python -c 'import secrets; print(secrets.token_hex(32))')":
        Run(),
    "export FDRL_MLFLOW_PASSWORD=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')": Run(),
    "mkdir -p ~/.config/fdrl && (umask 077 && printf "
    "'MLFLOW_AUTH_ADMIN_PASSWORD=%s\\nMLFLOW_FLASK_SERVER_SECRET_KEY=%s\\n' \"$MLFLOW_AUTH_ADMIN_PASSWORD\" "
    "\"$MLFLOW_FLASK_SERVER_SECRET_KEY\" > ~/.config/fdrl/mlflow-server.env)": Run(check=_check_secrets_file),
    "pip install boto3": NotHere("would install into the shared venv; boto3 is already in the test "
                                 "extra, and only `ray up` (not run here) needs it"),
    "ray get-auth-token --generate": Run(),  # in the laptop's stand-in home
    "ray up cluster.yaml": NotHere(NO_CLOUD + "the s3_server and fresh_mlflow_server fixtures stand "
                                   "in for the head's bucket and server (basic auth, READ by default)"),
    "ray rsync-up cluster.yaml ~/.config/fdrl/mlflow-server.env '~/.fdrl/mlflow-server.env'": Run(),
    "ray up --restart-only cluster.yaml": NotHere(NO_CLOUD + "it starts the head's MLflow server: "
                                                  "the fresh_mlflow_server fixture is that server"),
    "ray dashboard cluster.yaml": NotHere(NO_CLOUD + "a port forward to the head; jobs here run "
                                          "on the module's local Ray"),
    # --- 3. MLflow access -------------------------------------------------------------------
    "export HEAD_IP=$(aws ec2 describe-instances --region $REGION --filters "
    "Name=tag:ray-cluster-name,Values=fdrl Name=tag:ray-node-type,Values=head "
    "Name=instance-state-name,Values=running --query 'Reservations[].Instances[].PrivateIpAddress' "
    "--output text)": NotHere(NO_CLOUD + "EC2; HEAD_IP is 127.0.0.1 here (see PLACES)"),
    "ssh -i ~/.ssh/ray-autoscaler_$REGION.pem -N -L 5000:$HEAD_IP:5000 ubuntu@$(ray get-head-ip "
    "cluster.yaml) &": NotHere(NO_CLOUD + "the tunnel; the server already listens on 127.0.0.1 "
                               "(its port replaces 5000)"),
    "MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=\"$MLFLOW_AUTH_ADMIN_PASSWORD\" python -c "
    "'import os, mlflow.server; mlflow.server.get_app_client(\"basic-auth\", "
    "tracking_uri=\"http://127.0.0.1:5000\").create_user(\"fdrl-jobs\", os.environ[\"FDRL_MLFLOW_PASSWORD\"])'":
        Run(check=_check_jobs_user),
    "export RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token": Run(),  # the laptop's only
    "export FDRL_ENV=$(printf '{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"http://%s:5000\", "
    "\"MLFLOW_TRACKING_USERNAME\": \"fdrl-jobs\", \"MLFLOW_TRACKING_PASSWORD\": \"%s\"}}' \"$HEAD_IP\" "
    "\"$FDRL_MLFLOW_PASSWORD\")": Run(),
    # --- 4. Prepare the data ----------------------------------------------------------------
    "ray exec cluster.yaml 'mkdir -p ~/raw'": Run(),
    "ray rsync-up cluster.yaml ~/raw/img_align_celeba.zip '~/raw/img_align_celeba.zip'": Run(),
    # CelebA at 16x16: its full prior (step 5) at 64x64 is a 12288^2 factor, minutes on 2 cores.
    "ray job submit --working-dir . --runtime-env-json \"$FDRL_ENV\" -- python datasets/prepare.py celeba "
    "'~/raw/img_align_celeba.zip' --out s3://YOUR-BUCKET/data/celeba": Run(add=PREPARE + " --resolution 16"),
    "ray job submit --working-dir . --runtime-env-json \"$FDRL_ENV\" -- python datasets/prepare.py lsun "
    "'~/raw/church_outdoor_train_lmdb' --out s3://YOUR-BUCKET/data/church": Run(add=PREPARE),
    "ray job submit --working-dir . --runtime-env-json \"$FDRL_ENV\" -- python datasets/prepare.py cifar10 "
    "'~/raw/cifar-10-batches-py' --out s3://YOUR-BUCKET/data/cifar10": Run(add=PREPARE),
    "ray job submit --working-dir . --runtime-env-json \"$FDRL_ENV\" -- python datasets/prepare.py cat2dog "
    "'~/raw/cat2dog' --out s3://YOUR-BUCKET/data/cat2dog": Run(add=PREPARE),
    "ray job submit --working-dir . --runtime-env-json \"$FDRL_ENV\" -- python datasets/prepare.py folder "
    "'~/raw/photos' --out s3://YOUR-BUCKET/data/photos --resolution 64": Run(add=PREPARE),
    "ray job submit --working-dir . --runtime-env-json \"$FDRL_ENV\" -- python datasets/prepare.py mnist "
    "--out s3://YOUR-BUCKET/data/mnist": Run(add=PREPARE),
    # --- 5. Fit the prior ---------------------------------------------------------------------
    "ray job submit --working-dir . --runtime-env-json \"$FDRL_ENV\" -- python datasets/fit_prior.py "
    "s3://YOUR-BUCKET/data/church --kind lowrank --rank 512 --out "
    "s3://YOUR-BUCKET/priors/church-lowrank.safetensors": Run(add="--rank 8"),  # 24 images
    "ray job submit --working-dir . --runtime-env-json \"$FDRL_ENV\" -- python datasets/fit_prior.py "
    "s3://YOUR-BUCKET/data/celeba --kind full --out s3://YOUR-BUCKET/priors/celeba-full.safetensors": Run(),
    # --- 6. Train: --gpu wait would wait for GPU nodes that never come: --gpu auto -------------
    "ray job submit --working-dir . --runtime-env-json \"$FDRL_ENV\" -- python jobs/fdrl_church.py "
    "--data s3://YOUR-BUCKET/data/church --workers 8 --gpu wait --storage s3://YOUR-BUCKET/runs "
    "--prior-path s3://YOUR-BUCKET/priors/church-lowrank.safetensors":
        Run(add=TRAIN + " --batch 2 --gpu auto --prior-rank 8"),
    # --- 7. Sample and evaluate ---------------------------------------------------------------
    "ray job submit --working-dir . --runtime-env-json \"$FDRL_ENV\" -- python jobs/sample.py --model "
    "models:/fdrl-church@candidate --n 1000 --workers 4 --out s3://YOUR-BUCKET/samples/church":
        Run(add=SAMPLE + " --workers 1"),
    # Unlabelled data: standard FID is its only metric, so it stays on, at FID-8.
    "ray job submit --working-dir . --runtime-env-json \"$FDRL_ENV\" -- python jobs/evaluate.py --model "
    "models:/fdrl-church@candidate --out s3://YOUR-BUCKET/eval/church --fid-weights "
    "s3://YOUR-BUCKET/weights/weights-inception-2015-12-05-6726825d.pth":
        Run(add="--n 8 --domain-n 8 --workers 1", before=_upload_inception_weights),
    # --- 9. Stop --------------------------------------------------------------------------------
    "ray down cluster.yaml": NotHere(NO_CLOUD + "the fixtures stop their servers"),
    # The head's /tmp: a folder of this test, so that parallel sessions' files never meet.
    "ray exec cluster.yaml '~/fdrl-venv/bin/python -c \" import os, sqlite3 from fdrl.data import storage "
    "for db in (\\\"mlflow.db\\\", \\\"basic_auth.db\\\"): out = sqlite3.connect(\\\"/tmp/\\\" + db) "
    "sqlite3.connect(os.path.expanduser(\\\"~/mlflow/\\\" + db)).backup(out) out.close() "
    "storage.put_file(\\\"/tmp/\\\" + db, \\\"s3://YOUR-BUCKET/mlflow-db/\\\" + db) \"'":
        Run(sub=(('\\"/tmp/\\"', '\\"{head_tmp}/\\"'),)),
    "ray exec cluster.yaml '~/fdrl-venv/bin/python -c \" from fdrl.data import storage for db in "
    "(\\\"mlflow.db\\\", \\\"basic_auth.db\\\"): storage.get_file(\\\"s3://YOUR-BUCKET/mlflow-db/\\\" + db, "
    "storage.resolve(\\\"~/mlflow/\\\" + db)) \"'": Run(head="new head", check=_check_restored_databases),
}
# What the README assumes has run: ./dev demo, at smoke size.
DEMO = Run(add=TRAIN)

# ================================================================================ the places


@dataclass
class Head:
    """A Ray head's stand-in: its home (raw data, ~/fdrl-venv, ~/mlflow), its own environment
    (no laptop exports reach it; AWS keys stand in for its instance role) and the folder a
    ``ray job submit --working-dir .`` upload becomes."""
    home: Path
    env: dict
    workdir: Path


@dataclass
class Place:
    """Where one document's commands run."""
    name: str
    root: Path
    cwd: Path
    env: dict  # the user's shell environment; exports and assignments accumulate here
    subs: list = field(default_factory=list)  # document-wide (documented, here) replacements
    vars: dict = field(default_factory=dict)  # values of {name} in Run.sub
    pins: dict = field(default_factory=dict)  # env values kept after every command (see PLACES)
    heads: dict = field(default_factory=dict)
    server: object = None
    fake_inputs: object = None
    report: list = field(default_factory=list)


def link_checkout(folder: Path) -> Path:
    """A stand-in checkout: the repository's code linked, .venv the venv running the tests."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("jobs", "datasets", "docs", "platform", "cluster.yaml"):
        (folder / name).symlink_to(REPO / name)
    (folder / ".venv").symlink_to(VENV)
    return folder


@pytest.fixture(scope="module")
def base_env(s3_server, request, tmp_path_factory):
    """The environment every place starts from, set before the module's Ray starts so that its
    workers inherit it: the S3 server's keys, a node cache of this module's own, no tracking
    settings from outside, the venv's programs first on PATH."""
    cache = tmp_path_factory.mktemp("node-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FDRL_CACHE", str(cache))
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "FDRL_HOME", "RAY_ADDRESS"):
            mp.delenv(key, raising=False)
        request.getfixturevalue("ray_cluster")
        env = dict(os.environ, PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                   PYTHONUNBUFFERED="1")
        yield env


@pytest.fixture(scope="module")
def checkout(base_env, tmp_path_factory, fake_inputs):
    """The stand-in checkout of README.md, compose.md and dgflow.md, after ``./dev demo``. The
    user's home holds the raw data README names; data/mnist5k is MNIST-5k at smoke size (its
    first 512 digits), so the demo does not build all 5000."""
    from fdrl.data.writer import convert

    root = tmp_path_factory.mktemp("checkout")
    home = root / "home"
    fake_inputs.cifar10(home / "data", per_batch=6)
    fake_inputs.image_folder(home / "my-images", 24, size=(40, 30))
    cwd = link_checkout(root / "fdrl-platform")
    convert("mnist", None, cwd / "data" / "mnist5k", shard_size=64, limit=512, progress=False)
    place = Place("checkout", root, cwd, dict(base_env, HOME=str(home)))
    run_command(place, demo_command(), DEMO)
    return place


@pytest.fixture(scope="module")
def own_data(base_env, tmp_path_factory):
    """docs/own-data.md: an empty folder; REPO is a stand-in checkout; /tmp/userdata/demo is a
    folder of this test."""
    root = tmp_path_factory.mktemp("own-data")
    repo = link_checkout(root / "repo")
    (root / "home").mkdir()
    place = Place("own-data", root, root, dict(base_env, HOME=str(root / "home"), REPO=str(repo)))
    place.subs = [("/tmp/userdata/demo", str(root / "userdata" / "demo"))]
    return place


@pytest.fixture(scope="module")
def cluster(base_env, tmp_path_factory, fake_inputs, fresh_mlflow_server, s3_server):
    """docs/cluster.md: the laptop (its checkout and home), the head and a new head after
    `ray down` (their homes, environments and job folders), a bucket name, the head's server."""
    from fdrl.data.writer import convert  # noqa: F401  (imports fdrl before the jobs do)

    root = tmp_path_factory.mktemp("cluster")
    laptop = root / "laptop"
    fake_inputs.celeba(laptop / "raw", 24)  # copied to the head by the documented rsync-up
    shutil.rmtree(laptop / "raw" / "img_align_celeba")  # only the zip is needed
    heads = {}
    for name in ("head", "new head"):
        home = root / name.replace(" ", "-")
        (home / "mlflow").mkdir(parents=True)  # as cluster.yaml's setup commands make it
        (home / "tmp").mkdir()
        (home / "fdrl-venv").symlink_to(VENV)
        env = dict(base_env, HOME=str(home), PATH=f"{home / 'fdrl-venv' / 'bin'}{os.pathsep}"
                                                   f"{base_env['PATH']}")
        # MLflow 3 clients fetch a proxied artifact from a presigned S3 URL when the server offers
        # it; moto with IAM auth answers those with 500 (it wants an Authorization header), so
        # here they fetch through the server. On AWS the presigned URLs work.
        env["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] = "false"
        heads[name] = Head(home, env, link_checkout(home / "working_dir"))
    head = heads["head"].home
    # The server's databases are the head's ~/mlflow (the backup in step 9 reads them).
    (head / "mlflow").rmdir()
    (head / "mlflow").symlink_to(fresh_mlflow_server.workdir)
    fake_inputs.lsun(head / "raw" / "church_outdoor_train_lmdb", {
        f"{i:04d}".encode(): fake_inputs.encoded(fake_inputs.noise(160, 128, i), "WEBP")
        for i in range(24)})
    fake_inputs.cifar10(head / "raw", per_batch=4)
    fake_inputs.cat2dog(head / "raw" / "cat2dog", {"trainA": 4, "trainB": 4, "testA": 2, "testB": 2})
    fake_inputs.image_folder(head / "raw" / "photos", 8, size=(80, 70), fmt="JPEG", ext="jpg")

    bucket = f"docs-{uuid.uuid4().hex[:10]}"
    port = fresh_mlflow_server.uri.rsplit(":", 1)[1]
    place = Place("cluster", root, link_checkout(laptop / "fdrl-platform"),
                  dict(base_env, HOME=str(laptop), HEAD_IP="127.0.0.1"), heads=heads,
                  server=fresh_mlflow_server, fake_inputs=fake_inputs)
    place.subs = [("YOUR-BUCKET", bucket), (":5000", f":{port}")]
    place.vars = {"bucket": bucket, "head_tmp": str(head / "tmp")}
    # The head's server was started from the secrets file with its own admin password.
    place.pins = {"MLFLOW_AUTH_ADMIN_PASSWORD": fresh_mlflow_server.admin_password}
    place.s3 = s3_server
    return place


# ================================================================================= running


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


@dataclass
class Result:
    rc: int
    output: str
    how: str


def bash_words(text: str, env: dict, cwd: Path) -> list[str]:
    """``text``'s words after bash's expansions (~, $VAR, quotes), as the program gets them."""
    proc = subprocess.run(["bash", "-c", "printf '%s\\0' " + text], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"bash could not expand {text!r}: {proc.stderr}"
    return proc.stdout.split("\0")[:-1]


def unquoted(text: str) -> str:
    """``text`` without its quoted parts and escaped characters."""
    out, quote, i = [], "", 0
    while i < len(text):
        c = text[i]
        if quote == "'":
            quote = "" if c == "'" else quote
        elif c == "\\":
            i += 2
            continue
        elif quote == '"':
            quote = "" if c == '"' else quote
        elif c in "'\"":
            quote = c
        else:
            out.append(c)
        i += 1
    return "".join(out)


def is_simple(text: str) -> bool:
    """One program and its words: no assignment, list, pipe, redirection, subshell or loop."""
    return not ASSIGNMENT.match(text) and not re.search(r"[;&|<>()`\n]", unquoted(text))


def run_python(argv: list[str], cwd: Path, env: dict) -> Result:
    """``python SCRIPT ARGS`` in this process: argv, working folder, environment (and sys.path[0]
    the script's folder) as ``python`` would set them; SystemExit is its exit."""
    script = Path(cwd, argv[1])
    saved = (list(sys.argv), list(sys.path), os.getcwd(), dict(os.environ))
    buffer = io.StringIO()
    rc = 0
    try:
        sys.argv = [str(script), *argv[2:]]
        sys.path.insert(0, str(script.parent))
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        with contextlib.redirect_stdout(Tee(sys.stdout, buffer)), \
                contextlib.redirect_stderr(Tee(sys.stderr, buffer)):
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as stop:
                if isinstance(stop.code, str):  # sys.exit("error: ...") prints it, exits 1
                    print(stop.code, file=sys.stderr)
                    rc = 1
                else:
                    rc = stop.code or 0
    finally:
        sys.argv[:], sys.path[:] = saved[0], saved[1]
        os.chdir(saved[2])
        os.environ.clear()
        os.environ.update(saved[3])
    return Result(rc, buffer.getvalue(), "in-process")


def run_shell(text: str, place: Place, env: dict, cwd: Path, keep_state: bool) -> Result:
    """``text`` in bash; with ``keep_state``, its exports, assignments and cd carry over."""
    state = place.root / ".shell-state"
    state.mkdir(exist_ok=True)
    script = (f"set -a\n{text}\n__rc=$?\npwd > '{state}/cwd'\nenv -0 > '{state}/env'\n"
              "exit $__rc\n")
    proc = subprocess.run(["bash", "-c", script], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if keep_state and proc.returncode == 0:
        place.cwd = Path((state / "cwd").read_text().strip())
        fresh = dict(item.split("=", 1) for item in (state / "env").read_text().split("\0") if "=" in item)
        for key in ("_", "SHLVL", "PWD", "OLDPWD", "__rc"):
            fresh.pop(key, None)
        place.env = {**fresh, **place.pins}
    return Result(proc.returncode, output, "bash")


def run_aws(argv: list[str], text: str, place: Place) -> Result:
    """The AWS CLI when installed, on the moto server (AWS_ENDPOINT_URL_S3 from the fixture);
    otherwise the same S3 call through boto3, so that the bucket and its rules exist either way."""
    if shutil.which("aws", path=place.env["PATH"]):
        return run_shell(text, place, place.env, place.cwd, keep_state=False)
    import boto3

    options = dict(zip(argv[3::2], argv[4::2]))
    s3 = boto3.session.Session().client("s3", endpoint_url=place.env["AWS_ENDPOINT_URL_S3"],
                                        region_name=options.get("--region", "us-east-1"))
    if argv[2] == "create-bucket":
        region = options["--create-bucket-configuration"].split("=", 1)[1]
        s3.create_bucket(Bucket=options["--bucket"],
                         CreateBucketConfiguration={"LocationConstraint": region})
    elif argv[2] == "put-bucket-lifecycle-configuration":
        s3.put_bucket_lifecycle_configuration(
            Bucket=options["--bucket"],
            LifecycleConfiguration=json.loads(options["--lifecycle-configuration"]))
    else:
        raise AssertionError(f"no stand-in for aws {' '.join(argv[1:3])}")
    return Result(0, "", "boto3 (no aws CLI installed)")


def run_job_submit(argv: list[str], place: Place, spec: Run) -> Result:
    """``ray job submit OPTIONS -- ENTRYPOINT`` as the head runs it: the entrypoint string that
    ``ray job submit`` builds (list2cmdline) is expanded by the head's shell, and runs in the
    uploaded working directory with the head's environment plus the runtime env's env_vars."""
    sep = argv.index("--")
    options, entrypoint = argv[3:sep], list2cmdline(argv[sep + 1:])
    head = place.heads[spec.head]
    env = dict(head.env)
    assert "--working-dir" in options and options[options.index("--working-dir") + 1] == ".", options
    if "--runtime-env-json" in options:
        runtime_env = json.loads(options[options.index("--runtime-env-json") + 1])
        assert set(runtime_env) <= {"env_vars"}, f"runtime env keys not emulated: {set(runtime_env)}"
        env.update(runtime_env.get("env_vars", {}))
    words = bash_words(entrypoint, env, head.workdir)
    laptop = place.env["HOME"]  # one machine here, but the head cannot see the laptop's disk
    assert not any(laptop in w for w in words), f"the head was given a path of the laptop: {words}"
    assert words[0] == "python" and words[1].endswith(".py"), entrypoint
    result = run_python(words, head.workdir, env)
    result.how = "ray job submit: in-process on the head"
    return result


def execute(place: Place, cmd: Command, spec: Run) -> Result:
    text = cmd.text
    for documented_text, here in [*place.subs, *((a, b.format(**place.vars)) for a, b in spec.sub)]:
        text = text.replace(documented_text, here)
    if spec.add:
        text = f"{text} {spec.add}"
    if not is_simple(text):
        return run_shell(text, place, place.env, place.cwd, keep_state=True)
    argv = bash_words(text, place.env, place.cwd)
    if argv[0] == "aws":
        return run_aws(argv, text, place)
    if argv[:3] == ["ray", "job", "submit"]:
        return run_job_submit(argv, place, spec)
    if argv[:2] == ["ray", "exec"]:  # the command runs in a shell on the head, in its home
        head = place.heads[spec.head]
        result = run_shell(argv[3], place, head.env, head.home, keep_state=False)
        result.how = "ray exec: bash on the head"
        return result
    if argv[:2] == ["ray", "rsync-up"]:  # the laptop's shell expanded SRC; ~ in DEST is the head's
        head = place.heads[spec.head]
        dest = Path(argv[4].replace("~", str(head.home), 1) if argv[4].startswith("~") else argv[4])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(argv[3], dest)
        return Result(0, "", "copy to the head")
    if Path(argv[0]).name in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
        return run_python(argv, place.cwd, place.env)
    return run_shell(text, place, place.env, place.cwd, keep_state=True)


def output_checks(cmd: Command, place: Place, result: Result) -> None:
    """What every run of a kind of command must leave, beyond its exit code."""
    from fdrl.data import storage

    words = cmd.text.split()
    script = next((w for w in words if w.endswith(".py")), "")
    if re.search(r"jobs/fdrl_\w+\.py$", script) and "--dry-run" not in words:
        assert "== done ==" in result.output and "registered model:      models:/" in result.output, \
            "a training job ended without its summary and a registered model"
    if script.endswith("datasets/prepare.py"):
        out = cmd.text.split("--out", 1)[1].split()[0]
        for old, new in place.subs:
            out = out.replace(old, new)
        if not storage.is_uri(out):
            out = str(place.cwd / out) if not Path(out).is_absolute() else out
        manifests = [storage.join(out, "manifest.parquet")]
        if " cat2dog " in f" {cmd.text} ":
            manifests = [storage.join(out, d, "manifest.parquet") for d in ("trainA", "trainB")]
        for manifest in manifests:
            assert storage.is_file(manifest), f"no {manifest}"


def run_command(place: Place, cmd: Command, spec: Run) -> None:
    if spec.before:
        spec.before(place)
    start = time.monotonic()
    try:
        result = execute(place, cmd, spec)
    except Exception as err:
        place.report.append((cmd, "raised", time.monotonic() - start, type(err).__name__))
        raise AssertionError(f"{cmd.where()}\nraised {type(err).__name__}: {err}") from err
    seconds = time.monotonic() - start
    tail = result.output[-4000:]
    expected = cmd.expected_error
    try:
        if expected:
            assert result.rc != 0, f"exit 0, but the docs show it failing with {expected!r}"
            assert expected in normalise(result.output), f"expected {expected!r} in the output"
        else:
            assert result.rc == 0, f"exit code {result.rc}"
            output_checks(cmd, place, result)
        if spec.check:
            spec.check(place, result.output)
    except AssertionError as err:
        place.report.append((cmd, result.how, seconds, "FAILED"))
        raise AssertionError(f"{cmd.where()}\n({result.how}, {seconds:.1f} s) {err}\n"
                             f"--- output (tail) ---\n{tail}") from None
    place.report.append((cmd, result.how, seconds, "failed as documented" if expected else "ok"))


def print_report(place: Place, doc: str) -> None:
    print(f"\n{doc}: {len(place.report)} commands, {sum(r[2] for r in place.report):.1f} s")
    for cmd, how, seconds, status in place.report:
        print(f"  {seconds:7.1f} s  {status:22} {cmd.doc}:{cmd.line}  [{how}]  {cmd.key[:110]}")


# =================================================================================== tests


def test_extraction_rules():
    """Fences, continuation lines, comments, here-documents, loops, quotes over lines, output."""
    doc = "\n".join([
        "```bash",
        "python jobs/a.py --x 1 \\",
        "    --y 2   # a comment",
        "# only a comment",
        "echo '# not a comment' \"#nor this\"",
        "cat > f.json <<'EOF'",
        "{\"a\": 1}",
        "EOF",
        "for r in a b; do",
        "  echo $r",
        "done",
        "ray exec c.yaml 'python -c \"",
        "for i in (1,):",
        "    print(i)",
        "\"'",
        "this line is output",
        "```",
        "- a list item",
        "  ```json",
        "  {\"python\": 1}",
        "  ```",
        "```",
        "error: shown output",
        "```",
        "```",
        "python not/after/a/shell/block.py",
        "```",
        "```yaml",
        "ray: not a command",
        "```",
    ])
    commands, skipped = extract("x.md", doc)
    assert [c.key for c in commands] == [
        "python jobs/a.py --x 1 --y 2",
        "echo '# not a comment' \"#nor this\"",
        "cat > f.json <<'EOF' {\"a\": 1} EOF",
        "for r in a b; do echo $r done",
        "ray exec c.yaml 'python -c \" for i in (1,): print(i) \"'",
        "python not/after/a/shell/block.py",
    ]
    assert commands[4].text == "ray exec c.yaml 'python -c \"\nfor i in (1,):\n    print(i)\n\"'"
    assert [c.line for c in commands] == [2, 5, 6, 9, 12, 26]
    assert skipped == ["x.md:16: this line is output"]
    assert commands[4].expected_error is None and commands[5].output == []
    commands, _ = extract("y.md", "```sh\npython a.py\n```\n```\nerror: no such flag --x\n```\n")
    assert commands[0].expected_error == "error: no such flag --x"


def test_every_documented_command_is_in_the_table():
    commands = documented()
    unknown = [c.where() for c in commands if c.key not in COMMANDS]
    assert not unknown, "add these documented commands to COMMANDS (Run or NotHere):\n" + \
        "\n".join(unknown)
    stale = set(COMMANDS) - {c.key for c in commands}
    assert not stale, "COMMANDS entries no document has any more:\n" + "\n".join(sorted(stale))
    assert len(commands) == len({c.key for c in commands}), "a command is documented twice"


def test_not_here_is_never_a_job():
    """Every jobs/, datasets/ and docs/examples/ script and every ray job submit runs."""
    for key, spec in COMMANDS.items():
        if isinstance(spec, NotHere):
            assert not re.search(r"\b(jobs|datasets|docs/examples)/\w+\.py\b", key), key
            assert not key.startswith("ray job submit"), key
            assert spec.why, key


def test_shell_blocks_hold_no_unknown_program():
    """A skipped line that looks like a program's invocation is a command with an unknown
    program: add that program to PROGRAMS."""
    suspicious = [line for doc in DOCS for line in extract(doc, (REPO / doc).read_text())[1]
                  if re.search(r"(\.py|\.sh)\b|^\S+: (\.?/|\S+/bin/)|\s--\w", line)]
    assert not suspicious, "\n".join(suspicious)


def _place_for(doc: str, request) -> Place:
    if doc == "docs/own-data.md":
        return request.getfixturevalue("own_data")
    if doc == "docs/cluster.md":
        return request.getfixturevalue("cluster")
    return request.getfixturevalue("checkout")  # README.md, compose.md, dgflow.md: the repo root


@pytest.mark.parametrize("doc", [d for d in DOCS if "```" in (REPO / d).read_text()])
def test_documented_commands_run(doc, request):
    commands = [c for c in documented() if c.doc == doc]
    runs = [(c, COMMANDS[c.key]) for c in commands if isinstance(COMMANDS.get(c.key), Run)]
    if not runs:
        pytest.skip(f"{doc} has no command to run")
    place = _place_for(doc, request)
    place.report = [r for r in place.report if r[0].doc.startswith("dev")] if doc == "README.md" else []
    try:
        for cmd, spec in runs:
            run_command(place, cmd, spec)
    finally:
        print_report(place, doc)
