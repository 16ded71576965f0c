"""A web page for generating videos with Open-Sora v1.1 or v1.2 models: prompt, size, sampling settings and a mode (text to video,
image to video, connecting two images, extending or editing an uploaded video).

    python scripts/app.py                      # the shipped model, on http://127.0.0.1:7860
    python scripts/app.py --port 8000 --model-path converted/stdit2 --vae-path converted/vae \
        --text-encoder-path converted/t5

The page is served on 127.0.0.1 only unless --host says otherwise. It serves no file but the videos it made
and the files the user uploaded, both kept in --output-dir (default: a new temporary directory), and it
generates one video at a time; later requests wait in a queue.
"""

import argparse
import html
import logging
import os
import socket
import sys
import tempfile
import traceback

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import UserError, run_cli  # noqa: E402

TEXT_TO_VIDEO = "Text to video"
IMAGE_TO_VIDEO = "Image to video"
CONNECT = "Connect two images"
EXTEND = "Extend a video"
EDIT = "Edit a video"
# The upload and setting inputs each mode shows; the others are hidden.
MODE_INPUTS = {
    TEXT_TO_VIDEO: (),
    IMAGE_TO_VIDEO: ("image",),
    CONNECT: ("image", "last_image"),
    EXTEND: ("video", "kept_frames"),
    EDIT: ("video", "edit_ratio"),
}
EXAMPLE_PROMPT = "a red circle moving right on a dark background"
MAX_UPLOAD_SIZE = "50mb"  # references are resized to the video's size; larger files only take longer to read


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every script reports a bad flag
        raise UserError(f"{message} (see --help)")


def parse_args(argv):
    from pipelines.open_sora.cli import DTYPES
    from pipelines.open_sora.settings import DEFAULT_MODEL_DIR, is_pipeline_dir

    parser = ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model-path", default=DEFAULT_MODEL_DIR,
                        help="STDiT2/STDiT3 or pipeline directory (default: the shipped model in assets/default_model)")
    parser.add_argument("--vae-path", help="AutoencoderKL or v1.2 video VAE directory (with an STDiT --model-path)")
    parser.add_argument("--text-encoder-path", help="paddlenlp T5 directory (with an STDiT --model-path)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="precision of the transformer and VAE (fp16/bf16 need a GPU)")
    parser.add_argument("--output-dir",
                        help="where generated videos and uploads are kept (default: a new temporary directory)")
    args = parser.parse_args(argv)
    args.dtype = DTYPES[args.dtype]
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: give a port between 1 and 65535")
    if not os.path.isdir(args.model_path):
        raise UserError(f"--model-path {args.model_path}: model directory not found; give a pipeline directory or an "
                        "STDiT directory written by save_pretrained or scripts/convert_checkpoint.py stdit2 or stdit3")
    if not is_pipeline_dir(args.model_path):
        for flag in ("vae_path", "text_encoder_path"):
            if not getattr(args, flag):
                raise UserError(f"--{flag.replace('_', '-')} is required with --model-path {args.model_path}")
    return args


def check_can_listen(host, port):
    """Fail before the model loads when the address is taken or is not one of this machine's."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            sock.bind((host, port))
    except OSError as error:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({error.strerror})") from None


def load_pipeline(args):
    """The shipped model or a pipeline directory as it is; separate directories with the sampler and size the
    STDiT was trained for (its inference.json), or its family's sample defaults, as scripts/inference.py does."""
    from pipelines import OpenSoraPipeline
    from pipelines.open_sora.settings import build_scheduler, family_defaults, is_pipeline_dir, read_model_defaults

    if is_pipeline_dir(args.model_path):
        return OpenSoraPipeline.from_pretrained(args.model_path, dtype=args.dtype)
    settings = {**family_defaults(args.model_path), **read_model_defaults(args.model_path)}
    height, width = settings["image_size"]
    trained_size = dict(num_frames=settings["num_frames"], height=height, width=width, fps=settings["fps"],
                        frame_interval=settings["frame_interval"])
    return OpenSoraPipeline.from_component_paths(args.model_path, args.vae_path, args.text_encoder_path,
                                                 build_scheduler(settings), dtype=args.dtype, trained_size=trained_size)


def whole_number(value, label, minimum=1):
    """A form's number as an int; an empty field or one below `minimum` is the user's to fix."""
    if value is None or value < minimum:
        raise UserError(f"{label}: give a whole number of at least {minimum}")
    return int(value)


def require(upload, what, mode):
    if upload is None:
        raise UserError(f"{mode} needs {what}: upload one")
    return upload


def build_conditions(mode, image, last_image, video, kept_frames, edit_ratio):
    """The Conditions of a mode, from the uploads it needs (None for text to video)."""
    from pipelines import Conditions

    if mode == TEXT_TO_VIDEO:
        return None
    if mode == IMAGE_TO_VIDEO:
        return Conditions.image_to_video(require(image, "an image", mode))
    if mode == CONNECT:
        return Conditions.connect(require(image, "a first image", mode), require(last_image, "a last image", mode))
    if mode == EXTEND:
        kept_frames = whole_number(kept_frames, "Frames of the video that start the new clip")
        return Conditions.extend(require(video, "a video", mode), num_frames=kept_frames)
    if mode == EDIT:
        return Conditions.edit(require(video, "a video", mode), edit_ratio=float(edit_ratio))
    raise UserError(f"unknown mode {mode!r}; choose one of {list(MODE_INPUTS)}")


def page_error(message):
    # gr.Error renders its message as HTML, and messages may quote the prompt or a file name.
    import gradio as gr

    return gr.Error(html.escape(message), duration=None, print_exception=False)


def make_generate(pipe, videos_dir, aesthetic_score=None):
    """The page's Generate handler: returns the path of the written video, or raises gr.Error with one line.
    `aesthetic_score` ends every prompt (v1.2 models' default, as in scripts/inference.py)."""
    import gradio as gr

    from pipelines.open_sora.conditioning import MaskGroupError
    from utils.media import save_video

    def generate(prompt, mode, image, last_image, video, kept_frames, edit_ratio, num_frames, height, width,
                 num_inference_steps, guidance_scale, seed, progress=gr.Progress()):
        def report_step(pipeline, step_index, timestep, callback_kwargs):
            progress((step_index + 1, pipeline.num_timesteps), desc="sampling", unit="steps")
            return callback_kwargs

        try:
            if guidance_scale is None:
                raise UserError("Guidance scale: give a number")
            conditions = build_conditions(mode, image, last_image, video, kept_frames, edit_ratio)
            out = pipe(
                prompt,
                conditions=conditions,
                num_frames=whole_number(num_frames, "Frames", minimum=2),  # one frame would be saved as an image
                height=whole_number(height, "Height"),
                width=whole_number(width, "Width"),
                num_inference_steps=whole_number(num_inference_steps, "Sampling steps"),
                guidance_scale=float(guidance_scale),
                aesthetic_score=aesthetic_score,
                seed=whole_number(seed, "Seed", minimum=0),
                output_type="np",
                callback_on_step_end=report_step,
            )
            return save_video(out.frames[0], out.fps, os.path.join(videos_dir, "sample"))
        except MaskGroupError as error:  # its message names the mask group; the page knows modes
            raise page_error(f"{mode}: {error.problem}") from None
        except UserError as error:
            raise page_error(str(error)) from None
        except Exception as error:  # noqa: BLE001 - a bug of ours: the page gets one line, the console the traceback
            traceback.print_exc()
            raise page_error(f"internal error: {type(error).__name__}: {error}") from None

    return generate


def build_page(pipe, model_name, videos_dir, aesthetic_score=None):
    import gradio as gr

    size, sampling = pipe.default_size, pipe.default_sampling
    # System fonts: the default theme would fetch its font from Google on every page load.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="Open-Sora", theme=theme, analytics_enabled=False) as page:
        gr.Markdown(f"## Open-Sora on PaddlePaddle\nModel: `{model_name}`, trained for {size['num_frames']} frames of "
                    f"{size['height']}×{size['width']} pixels.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value=EXAMPLE_PROMPT, lines=2, elem_id="prompt")
                mode = gr.Radio(list(MODE_INPUTS), value=TEXT_TO_VIDEO, label="Mode", elem_id="mode")
                mode_inputs = dict(
                    image=gr.Image(label="Image (the first frame)", type="numpy", image_mode="RGB", sources=["upload"],
                                   visible=False, elem_id="image"),
                    last_image=gr.Image(label="Last frame", type="numpy", image_mode="RGB", sources=["upload"],
                                        visible=False, elem_id="last_image"),
                    video=gr.Video(label="Video", sources=["upload"], visible=False, elem_id="video"),
                    kept_frames=gr.Number(label="Frames of the video that start the new clip", precision=0, minimum=1,
                                          value=max(1, size["num_frames"] // 4), visible=False, elem_id="kept_frames"),
                    edit_ratio=gr.Slider(0.0, 1.0, value=0.5, step=0.05, visible=False, elem_id="edit_ratio",
                                         label="Edit ratio (0 keeps the video, 1 ignores it)"),
                )
                with gr.Row():
                    num_frames = gr.Number(label="Frames", value=size["num_frames"], precision=0, elem_id="num_frames")
                    height = gr.Number(label="Height", value=size["height"], precision=0, step=pipe.vae_scale_factor,
                                       elem_id="height")
                    width = gr.Number(label="Width", value=size["width"], precision=0, step=pipe.vae_scale_factor,
                                      elem_id="width")
                with gr.Row():
                    steps = gr.Number(label="Sampling steps", value=sampling["num_inference_steps"], precision=0,
                                      elem_id="steps")
                    guidance = gr.Number(label="Guidance scale", value=sampling["guidance_scale"], elem_id="guidance")
                    seed = gr.Number(label="Seed", value=42, precision=0, elem_id="seed")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                output = gr.Video(label="Generated video", show_download_button=True, interactive=False,
                                  elem_id="output")

        def show_inputs_of(selected_mode):
            return [gr.update(visible=name in MODE_INPUTS[selected_mode]) for name in mode_inputs]

        mode.change(show_inputs_of, mode, list(mode_inputs.values()), queue=False)  # not behind a generation
        generate_button.click(
            make_generate(pipe, videos_dir, aesthetic_score),
            [prompt, mode, *mode_inputs.values(), num_frames, height, width, steps, guidance, seed],
            output,
            concurrency_limit=1,  # two generations at once would only share the same cores
        )
    return page


def main(argv):
    from utils.io import ensure_writable_dir
    from utils.runtime import configure_cpu_runtime, quiet_library_logs

    configure_cpu_runtime()
    args = parse_args(argv)
    check_can_listen(args.host, args.port)
    quiet_library_logs()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's requests to check that it has started
    output_dir = os.path.abspath(args.output_dir or tempfile.mkdtemp(prefix="opensora-app-"))
    ensure_writable_dir(output_dir, "--output-dir")
    # Gradio serves its upload folder, its example cache and allowed_paths (none here); pointing both folders
    # into the output directory keeps every served file there. Videos written inside it are served as they
    # are instead of being copied.
    os.environ["GRADIO_TEMP_DIR"] = output_dir
    os.environ["GRADIO_EXAMPLES_CACHE"] = os.path.join(output_dir, "examples")
    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)  # the page shows the progress
    from pipelines.open_sora.settings import family_defaults

    page = build_page(pipe, os.path.basename(os.path.normpath(args.model_path)), os.path.join(output_dir, "videos"),
                      aesthetic_score=family_defaults(args.model_path)["aes"])
    print(f"outputs and uploads: {output_dir}", flush=True)
    page.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD_SIZE, show_api=False)


if __name__ == "__main__":
    run_cli(main)
