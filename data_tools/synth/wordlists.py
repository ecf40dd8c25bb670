"""Small built-in word lists per language for the synthetic OCR text source.

Common words of each language, written for this project (no external corpus), enough to
make pseudo-sentences whose character statistics resemble real text. Chinese is given as
common words (no spaces between words when joined).
"""

from __future__ import annotations


def _words(block: str) -> list[str]:
    return block.split()


EN = _words("""
the of and to in is you that it he was for on are as with his they at be this have from or
one had by word but not what all were we when your can said there use an each which she do
how their if will up other about out many then them these so some her would make like him into
time has look two more write go see number no way could people my than first water been call
who oil its now find long down day did get come made may part over new sound take only little
work know place year live me back give most very after thing our just name good sentence man
think say great where help through much before line right too mean old any same tell boy follow
came want show also around form three small set put end does another well large must big even
such because turn here why ask went men read need land different home us move try kind hand
picture again change off play spell air away animal house point page letter mother answer found
study still learn should America world report table figure model data training result section
method value image document text paper system page chapter total price order invoice account
""")

RU = _words("""
и в не на я быть он с что а по это она этот к но они мы как из у который то за свой весь год
от так о для ты же все тот мочь вы человек такой его сказать только или ещё бы себя один как
уже до время если сам когда другой вот говорить наш мой знать стать при чтобы дело жизнь кто
первый очень два день её новый рука даже во со раз где там под можно ну какой после их работа
без самый потом надо хотеть ли слово идти большой должен место иметь ничто отчёт таблица страница
документ данные результат система модель текст число цена счёт глава раздел город страна вопрос
""")

AR = _words("""
في من على إلى أن هذا هذه التي الذي كان عن مع هو هي لا ما كل بين بعد قبل عند حتى ذلك تلك
يوم سنة كتاب باب بيت مدرسة طالب معلم مدينة دولة عمل وقت ماء شمس قمر علم لغة عربية جديد كبير
صغير جميل أول آخر قال كتب قرأ ذهب جاء رأى عرف أخذ جعل وجد أعطى النص الصفحة الجدول التقرير
البيانات النتيجة الفصل القسم الرقم السعر الحساب الشركة الحكومة التعليم الصحة الاقتصاد التاريخ
""")

FA = _words("""
و در به از که این را با است برای آن یک خود تا کرد بر هم نیز گفت شود وی بود شد دارد کند
ما او می‌شود باید پس اگر همه سال روز کار کتاب خانه مدرسه دانشگاه شهر کشور ایران زبان فارسی
تهران مردم زندگی آب نان دست چشم راه خوب بزرگ کوچک جدید زیبا نخستین پژوهش گزارش جدول صفحه
داده نتیجه فصل بخش شماره قیمت حساب شرکت دولت آموزش سلامت اقتصاد تاریخ چهار پنج ژرف گذشته
""")

ZH = _words("""
我们 中国 今天 时间 问题 工作 学生 老师 学校 国家 经济 发展 社会 文化 历史 科学 技术 研究
报告 数据 结果 表格 页面 文档 系统 模型 方法 价格 账户 公司 政府 教育 健康 城市 人民 世界
生活 朋友 家庭 电话 电脑 手机 北京 上海 市场 企业 管理 服务 信息 网络 资料 部分 内容 主要
重要 新的 大的 小的 第一 一个 没有 可以 已经 因为 所以 但是 如果 这个 那个 他们 自己 知道
""")

DIGITS = "0123456789"
PUNCT = {
    "latin": ".,;:!?()-",
    "cyrillic": ".,;:!?()-",
    "arabic": "،.؛:!؟",
    "persian": "،.؛:!؟",
    "chinese": "，。；：！？（）",
}
LETTERS = {
    "latin": "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    "cyrillic": "АБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯабвгдеёжзийклмнопрстуфхцчшщъыьэюя",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "persian": "ابپتثجچحخدذرزژسشصضطظعغفقکگلمنوهی",
    "chinese": "".join(sorted(set("".join(ZH)))),
}
LOCAL_DIGITS = {"arabic": "٠١٢٣٤٥٦٧٨٩", "persian": "۰۱۲۳۴۵۶۷۸۹"}
WORDS = {"en": EN, "ru": RU, "ar": AR, "fa": FA, "zh": ZH}
