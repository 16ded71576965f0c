"""Mutation testing of the fast core modules: how many small planted bugs the tests catch, per module.

    python scripts/mutation_test.py                       # every module below, a few minutes on 2 cores
    python scripts/mutation_test.py "schedulers.rflow.*"  # only mutants whose names match (mutmut globs)

mutmut (setup.cfg [mutmut] lists the files and the tests) runs in a fresh copy of the working tree, so the
checkout is never touched. The script prints killed/total per module and the surviving mutants; to see one,
`cd WORK_DIR && mutmut show NAME`. Not part of the default test command.
"""

import argparse
import collections
import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# mutmut names a mutant module.x_function__mutmut_N or module.xǁClassǁmethod__mutmut_N.
MUTANTS = (
    "schedulers.*",
    "utils.io.*",
    "utils.media.*",
    "pipelines.open_sora.cli.x_split_json_tail__*",
    "pipelines.open_sora.cli.x_texts_per_loop__*",
    "pipelines.open_sora.cli.x_parse_mask_strategy__*",
    "pipelines.open_sora.cli.x_plan_jobs__*",
    "pipelines.open_sora.conditioning.*",
    "dataset.datasets.xǁVariableVideoTextDatasetǁload__*",
    "trainer.trainer.xǁExponentialMovingAverageǁ*",
)
# Decorators that mutmut 3 refuses by default although they are safe to wrap: without this the samplers'
# `sample`, the EMA update and `atomic_path` would not be mutated at all.
WRAPPABLE_DECORATORS = ("paddle.no_grad()", "contextlib.contextmanager", "property")


def copy_working_tree(work_dir):
    """Tracked and untracked (not ignored) files, as they are now, including uncommitted edits."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        source = os.path.join(REPO, name)
        if os.path.isfile(source):
            os.makedirs(os.path.join(work_dir, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(source, os.path.join(work_dir, name))


def allow_wrappable_decorators():
    """Let mutmut mutate functions whose only decorators are WRAPPABLE_DECORATORS.

    mutmut keeps a function's decorators on the trampoline that dispatches to the original or a mutant; the
    copies it dispatches to must then be undecorated, or a context manager would be wrapped twice.
    """
    import libcst as cst
    from mutmut.mutation import file_mutation

    def wrappable(node):
        names = [cst.Module([]).code_for_node(decorator.decorator) for decorator in node.decorators]
        return bool(names) and all(name in WRAPPABLE_DECORATORS for name in names)

    skip = file_mutation.MutationVisitor._skip_node_and_children

    def skip_unless_wrappable(self, node):
        if isinstance(node, cst.FunctionDef) and wrappable(node):
            return skip(self, node.with_changes(decorators=[]))
        return skip(self, node)

    arrange = file_mutation.function_trampoline_arrangement

    def arrange_with_plain_copies(function, mutants, class_name):
        declarations, methods, assignments, names = arrange(function, mutants, class_name)
        if wrappable(function):
            methods = [methods[0]] + [method.with_changes(decorators=[]) for method in methods[1:]]
        return declarations, methods, assignments, names

    file_mutation.MutationVisitor._skip_node_and_children = skip_unless_wrappable
    file_mutation.function_trampoline_arrangement = arrange_with_plain_copies


def module_of(mutant):
    return mutant.split(".x")[0]


def report(work_dir, patterns):
    lines = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work_dir, check=True, capture_output=True,
                           text=True).stdout.splitlines()
    statuses = dict(line.strip().rsplit(": ", 1) for line in lines if ": " in line)
    selected = {name: status for name, status in statuses.items() if any(fnmatch.fnmatch(name, p) for p in patterns)}
    counts = collections.defaultdict(collections.Counter)
    for name, status in selected.items():
        counts[module_of(name)][status] += 1
    print(f"\n{'module':45} killed / total")
    for module, count in sorted(counts.items()):
        total = sum(count.values())
        print(f"{module:45} {count['killed']:4} / {total:4}  {100 * count['killed'] / total:5.1f}%"
              + "".join(f"  {status} {n}" for status, n in sorted(count.items()) if status != "killed"))
    survivors = sorted(name for name, status in selected.items() if status != "killed")
    print("\nnot killed:\n" + "\n".join(f"  {name}: {selected[name]}" for name in survivors))
    print(f"\nwork dir: {work_dir}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("patterns", nargs="*", default=list(MUTANTS), help="mutant name globs (default: all modules)")
    parser.add_argument("--work-dir", help="where to copy the tree (default: a new temporary directory)")
    args = parser.parse_args()
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="opensora-mutation-")
    if os.path.exists(os.path.join(work_dir, "mutants")):
        shutil.rmtree(os.path.join(work_dir, "mutants"))
    copy_working_tree(work_dir)
    os.chdir(work_dir)
    sys.path.insert(0, work_dir)
    allow_wrappable_decorators()
    from mutmut.__main__ import _run

    _run(args.patterns, max_children=None)
    report(work_dir, args.patterns)


if __name__ == "__main__":
    main()
