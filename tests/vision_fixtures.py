"""Images and image servers for tests/test_vision.py: phone screenshots drawn as PNGs, broken and
hostile images, an http server that drips its image slowly, and the system prompt's stand-in."""

from __future__ import annotations

import base64
import io
import random
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageDraw

PHONE = (1080, 2400)  # what an Android phone's screenshot measures, width x height


def screenshot_png(size: tuple[int, int] = PHONE, colour=(30, 120, 200), label: str = "") -> bytes:
    """A PNG shaped like a phone's home screen: status bar, a banner, a grid of app icons."""
    width, height = size
    image = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width, height // 30), fill=(20, 20, 20))
    draw.rectangle((width // 20, height // 12, width - width // 20, height // 5), fill=colour)
    draw.text((width // 10, height // 10), label or f"{width}x{height}", fill=(255, 255, 255))
    icon = width // 6
    for row in range(4):
        for column in range(4):
            left = width // 16 + column * width // 4
            top = height // 4 + row * height // 8
            shade = tuple((c + 37 * (row * 4 + column)) % 256 for c in colour)
            draw.rounded_rectangle((left, top, left + icon, top + icon), icon // 5, fill=shade)
    draw.ellipse((width // 2 - 40, height - 160, width // 2 + 40, height - 80), fill=(90, 90, 90))
    return encode_png(image)


def noise_png(size: tuple[int, int] = (256, 256), seed: int = 7) -> bytes:
    """A PNG of random pixels: nothing compresses, so its pixel data is most of the file."""
    pixels = random.Random(seed).randbytes(size[0] * size[1] * 3)
    return encode_png(Image.frombytes("RGB", size, pixels))


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def header_bomb_png(width: int, height: int) -> bytes:
    """A valid PNG of a few kilobytes whose header declares ``width`` x ``height`` pixels (CRCs
    right, pixel data for a few rows only): a decompression bomb, which only the header tells."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    rows = zlib.compress((b"\x00" + b"\x00" * 3 * width) * 4, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def data_url(png: bytes) -> str:
    """What Open-AutoGLM sends: the screenshot as a base64 PNG data URL."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


class TricklingImageServer:
    """An http server whose one image arrives slowly: the body is sent in ``pieces`` over
    ``seconds`` (Content-Length declared, so the client waits for all of it)."""

    def __init__(self, body: bytes, seconds: float, pieces: int = 25):
        self.started = threading.Event()  # the GET arrived
        self.finished = threading.Event()  # the last byte went out (or the client left)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.started.set()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    step = -(-len(body) // pieces)
                    for index, start in enumerate(range(0, len(body), step)):
                        if index:
                            time.sleep(seconds / pieces)
                        self.wfile.write(body[start : start + step])
                        self.wfile.flush()
                except OSError:
                    pass
                finally:
                    outer.finished.set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/screen.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# A stand-in for Open-AutoGLM's Chinese system prompt (phone_agent/config/prompts_zh.py): its
# opening, its output format, its action list and its rules, about 3,400 characters, mostly CJK
# (three tokens each in the demo model's byte-level tokenizer).
_ACTIONS = (
    (
        'do(action="Launch", app="xxx")',
        "启动目标应用，比通过桌面导航更快。操作完成后，您将自动收到结果状态的截图。",
    ),
    (
        'do(action="Tap", element=[x,y])',
        "点击屏幕上的特定点，用于点击按钮、选择项目、从主屏幕打开应用程序。"
        "坐标系统从左上角 (0,0) 开始到右下角 (999,999) 结束。",
    ),
    (
        'do(action="Tap", element=[x,y], message="重要操作")',
        "与 Tap 相同，点击涉及财产、支付、隐私等敏感按钮时触发。",
    ),
    (
        'do(action="Type", text="xxx")',
        "在当前聚焦的输入框中输入文本。使用此操作前，请确保输入框已被聚焦（先点击它）。"
        "输入前会自动清除输入框中的现有文本，无需手动清除。",
    ),
    ('do(action="Type_Name", text="xxx")', "输入人名，基本功能与 Type 相同。"),
    ('do(action="Interact")', "当有多个满足条件的选项时触发的交互操作，询问用户如何选择。"),
    (
        'do(action="Swipe", start=[x1,y1], end=[x2,y2])',
        "从起始坐标拖动到结束坐标执行滑动手势，用于滚动内容、在屏幕之间导航、下拉通知栏。"
        "滑动持续时间会自动调整以实现自然的移动。",
    ),
    ('do(action="Note", message="True")', "记录当前页面内容以便后续总结。"),
    ('do(action="Call_API", instruction="xxx")', "总结或评论当前页面或已记录的内容。"),
    (
        'do(action="Long Press", element=[x,y])',
        "在屏幕上的特定点长按指定时间，用于触发上下文菜单、选择文本或激活长按交互。",
    ),
    (
        'do(action="Double Tap", element=[x,y])',
        "在屏幕上的特定点快速连续点击两次，用于缩放、选择文本或打开项目。",
    ),
    ('do(action="Take_over", message="xxx")', "接管操作，表示在登录和验证阶段需要用户协助。"),
    ('do(action="Back")', "返回上一个屏幕或关闭当前对话框，相当于按下 Android 的返回按钮。"),
    (
        'do(action="Home")',
        "回到系统桌面，相当于按下 Android 主屏幕按钮，可以从已知状态开始新任务。",
    ),
    ('do(action="Wait", duration="x seconds")', "等待页面加载，x 为需要等待的秒数。"),
    ('finish(message="xxx")', "结束任务的操作，表示准确完整地完成了任务，message 是终止信息。"),
)
_RULES = (
    "在执行任何操作前，先检查当前应用是否是目标应用，如果不是，先执行 Launch。",
    "如果进入到了无关页面，先执行 Back。如果执行 Back 后页面没有变化，请点击页面左上角的返回键"
    "进行返回，或者右上角的 X 号关闭。",
    "如果页面未加载出内容，最多连续 Wait 三次，否则执行 Back 重新进入。",
    "如果页面显示网络问题，需要重新加载，请点击重新加载。",
    "如果当前页面找不到目标联系人、商品、店铺等信息，可以尝试 Swipe 滑动查找。",
    "遇到价格区间、时间区间等筛选条件，如果没有完全符合的，可以放宽要求。",
    "在做社交媒体总结类任务时一定要筛选图文笔记。",
    "购物车全选后再点击全选可以把状态设为全不选。在做购物车任务时，如果购物车里已经有商品被选中，"
    "你需要点击全选后再点击取消全选，再去找需要购买或者删除的商品。",
    "在做外卖任务时，如果相应店铺购物车里已经有其他商品，你需要先把购物车清空，再去购买用户指定的外卖。",
    "在做点外卖任务时，如果用户需要点多个外卖，请尽量在同一店铺进行购买，如果无法找到可以下单，"
    "并说明某个商品未找到。",
    "请严格遵循用户意图执行任务，用户的特殊要求可以执行多次搜索、滑动查找。比如用户要找某个群并发消息，"
    "可以先搜索群名，找不到结果时去掉群字再搜索一次；用户要找可以带宠物的餐厅，可以搜索餐厅后找到筛选，"
    "找到设施，选择可带宠物，或者直接搜索可带宠物，必要时可以使用智能搜索。",
    "在选择日期时，如果原滑动方向与预期日期越来越远，请向反方向滑动查找。",
    "执行任务过程中如果有多个可选择的项目栏，请逐个查找每个项目栏，直到完成任务，一定不要在同一项目栏"
    "多次查找，从而陷入死循环。",
    "在执行下一步操作前请一定要检查上一步的操作是否生效，如果点击没生效，可能因为应用反应较慢，"
    "请先稍微等待一下，如果还是不生效请调整一下点击位置重试，如果仍然不生效请跳过这一步继续任务，"
    "并在结束信息中说明点击不生效。",
    "在执行任务中如果遇到滑动不生效的情况，请调整一下起始点位置，增大滑动距离重试，如果还是不生效，"
    "有可能是已经滑到底了，请继续向反方向滑动，直到顶部或底部，如果仍然没有符合要求的结果，"
    "请跳过这一步继续任务，并在结束信息中说明没找到要求的项目。",
    "在做游戏任务时如果在战斗页面如果有自动战斗一定要开启自动战斗，如果多轮历史状态相似要检查自动战斗"
    "是否开启。",
    "如果没有合适的搜索结果，可能是因为搜索页面不对，请返回到搜索页面的上一级尝试重新搜索，"
    '如果尝试三次返回上一级搜索后仍然没有符合要求的结果，执行 finish(message="原因")。',
    "在结束任务前请一定要仔细检查任务是否完整准确的完成，如果出现错选、漏选、多选的情况，"
    "请返回之前的步骤进行纠正。",
    "遇到登录、验证码、人脸识别、支付密码等需要用户本人参与的页面时，请执行 Take_over，"
    "并在 message 中说明需要用户完成的操作，不要自行尝试输入密码或者验证码。",
    "遇到弹窗广告、升级提示、权限申请等与任务无关的弹窗时，优先点击关闭、跳过、以后再说或者取消，"
    "不要点击立即升级、立即开通、去看看等会进入其他页面的按钮。",
    "输入搜索关键词之后，如果页面出现联想词列表，优先点击与用户需求完全一致的联想词；如果没有完全一致的，"
    "请点击键盘上的搜索按钮或者页面上的搜索按钮。",
    "在需要发送消息的任务中，发送之前请再次确认收件人和消息内容与用户要求一致，发送之后请确认消息已经"
    "出现在聊天记录中，再执行 finish。",
    "如果用户的任务需要在多个应用之间切换，请按照任务的先后顺序依次完成，每完成一个应用中的部分，"
    "使用 Note 记录需要的信息，最后使用 Call_API 进行总结。",
    "坐标均为相对坐标，横向和纵向都从 0 到 999，与截图的实际像素大小无关；"
    "点击时请尽量点击控件的中心位置。",
    "每一步只能输出一个操作，不要在同一个 answer 中输出多个操作，也不要输出格式之外的任何内容。",
)


def autoglm_system_prompt() -> str:
    lines = [
        "今天的日期是: 2025年12月11日 星期四",
        "你是一个智能体分析专家，可以根据操作历史和当前状态图执行一系列操作来完成任务。",
        "你必须严格按照要求输出以下格式：",
        "<think>{think}</think>",
        "<answer>{action}</answer>",
        "",
        "其中：",
        "- {think} 是对你为什么选择这个操作的简短推理说明。",
        "- {action} 是本次执行的具体操作指令，必须严格遵循下方定义的指令格式。",
        "",
        "操作指令及其作用如下：",
    ]
    for action, what in _ACTIONS:
        lines += [f"- {action}", f"    {what}"]
    lines += ["", "必须遵循的规则："]
    lines += [f"{number}. {rule}" for number, rule in enumerate(_RULES, 1)]
    lines += [
        "",
        "输出示例：",
        "<think>当前在系统桌面，用户要给文件传输助手发消息，需要先打开微信。</think>",
        '<answer>do(action="Launch", app="微信")</answer>',
        "<think>微信已经打开，聊天列表中可以看到文件传输助手，点击进入聊天页面。</think>",
        '<answer>do(action="Tap", element=[500,320])</answer>',
        "<think>消息已经发送成功，并且出现在聊天记录中，任务完成。</think>",
        '<answer>finish(message="已经给文件传输助手发送了消息")</answer>',
    ]
    return "\n".join(lines)
